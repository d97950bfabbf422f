"""A minimal instance of a JSON Schema: what the Moonshot emulator puts in generated tool-call arguments
and ``json_schema`` answers.

Deterministic and small: required properties only, the fewest array items allowed, the first of an
``enum`` / ``anyOf`` / ``oneOf``, a schema's own ``default`` / ``const`` / ``examples`` when it has
them, numbers at their lower bound. Local ``$ref`` (``#/$defs/…``, ``#/definitions/…``) is followed,
with a depth limit for recursive schemas. ``pattern`` is not honoured (a regex has no cheap inverse).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_MAX_DEPTH = 12
_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z", "date": "2026-01-01", "time": "00:00:00Z", "email": "user@example.com",
    "uri": "https://example.com/", "url": "https://example.com/", "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1", "ipv6": "::1", "hostname": "example.com",
}


def instance(schema: Any) -> Any:
    """A minimal value valid for ``schema`` (a JSON Schema as parsed JSON)."""
    return _Walker(schema if isinstance(schema, Mapping) else {}).value(schema, 0, "value")


class _Walker:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, Mapping) else None
            if node is None:
                return {}
        return node

    def value(self, schema: Any, depth: int, name: str) -> Any:
        if schema is True or not isinstance(schema, Mapping):
            return {} if depth == 0 else name
        if "$ref" in schema and isinstance(schema["$ref"], str) and depth < _MAX_DEPTH:
            return self.value({**self._resolve(schema["$ref"]), **{k: v for k, v in schema.items() if k != "$ref"}},
                              depth + 1, name)
        for word in ("const", "default"):
            if word in schema:
                return schema[word]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        if isinstance(schema.get("examples"), list) and schema["examples"]:
            return schema["examples"][0]
        for word in ("anyOf", "oneOf"):
            options = schema.get(word)
            if isinstance(options, list) and options:
                chosen = next((o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")),
                              options[0])
                rest = {k: v for k, v in schema.items() if k != word}
                return self.value({**rest, **chosen} if isinstance(chosen, Mapping) else chosen, depth + 1, name)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part["$ref"]) if isinstance(part, Mapping) and "$ref" in part else part
                if isinstance(part, Mapping):
                    merged = _merge(merged, part)
            return self.value(merged, depth + 1, name)
        return self._typed(schema, _type_of(schema), depth, name)

    def _typed(self, schema: Mapping[str, Any], kind: str, depth: int, name: str) -> Any:
        if kind == "object":
            if depth >= _MAX_DEPTH:
                return {}
            properties = _mapping(schema.get("properties"))
            required = [r for r in _list(schema.get("required")) if isinstance(r, str)]
            optional = [p for p in properties if p not in required]
            names = required + optional[: max(0, _count(schema.get("minProperties")) - len(required))]
            return {prop: self.value(properties.get(prop, {}), depth + 1, prop) for prop in names}
        if kind == "array":
            if depth >= _MAX_DEPTH:
                return []
            count = _count(schema.get("minItems"))
            values = [self.value(p, depth + 1, name) for p in _list(schema.get("prefixItems"))[:count]]
            values += [self.value(schema.get("items", {}), depth + 1, name) for _ in range(count - len(values))]
            return values
        if kind == "string":
            fmt = schema.get("format")
            text = _FORMATS.get(fmt, name) if isinstance(fmt, str) else name
            text += "x" * max(0, _count(schema.get("minLength")) - len(text))
            if _is_number(schema.get("maxLength")):
                text = text[: int(schema["maxLength"])]
            return text
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> int:
    """A ``min…`` keyword's value, 0 when absent or not a number."""
    return max(0, int(value)) if _is_number(value) else 0


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _type_of(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "any"


def _bound(schema: Mapping[str, Any], word: str) -> float | None:
    value: Any = schema.get(word)
    return float(value) if _is_number(value) else None


def _number(schema: Mapping[str, Any], integer: bool) -> int | float:
    step = 1 if integer else 0.5
    low, high = _bound(schema, "minimum"), _bound(schema, "maximum")
    above, below = _bound(schema, "exclusiveMinimum"), _bound(schema, "exclusiveMaximum")
    value = low if low is not None else 0.0
    if above is not None and value <= above:
        value = above + step
    if high is not None and value > high:
        value = high
    if below is not None and value >= below:
        value = below - step
    multiple = _bound(schema, "multipleOf")
    if multiple is not None and multiple > 0:
        value = math.ceil(value / multiple) * multiple
    return math.ceil(value) if integer else value


def _merge(left: Mapping[str, Any], right: Mapping[str, Any]) -> dict[str, Any]:
    """``allOf`` parts combined: properties and required lists joined, other words from the later part."""
    merged = {**left, **right}
    if isinstance(left.get("properties"), Mapping) and isinstance(right.get("properties"), Mapping):
        merged["properties"] = {**left["properties"], **right["properties"]}
    if isinstance(left.get("required"), list) and isinstance(right.get("required"), list):
        merged["required"] = [*left["required"], *[r for r in right["required"] if r not in left["required"]]]
    return merged
