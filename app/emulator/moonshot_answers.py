"""Answers a test scripts for the Moonshot emulator: what the model says, instead of the defaults.

Queued per API key or for any key (``emulator.answer(key, [...])``, ``POST /__fake/answers``),
FIFO, and consumed only by admitted requests: a request refused with a 4xx (or a scripted 429)
leaves the next answer in place. Each answer is checked when queued:

* ``content``: the text; ``json``: an object sent as the content string (not both);
* ``reasoning``: the thinking, streamed first when the request thinks (ignored when it does not);
* ``tool_calls``: ``[{"name": …, "arguments": {…} or "…"}]`` (a string goes out as is, even if it is
  not JSON, so a client's handling of bad arguments can be tested);
* ``web_search``: a query; when the request offers the builtin ``$web_search``, the answer is a call
  of it (alone: not with content or tool calls).

An empty answer ``{}`` plays the default answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

FIELDS = ("content", "reasoning", "tool_calls", "json", "web_search")


@dataclass(frozen=True, slots=True)
class ScriptedCall:
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ScriptedAnswer:
    content: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ScriptedCall, ...] = ()
    web_search: str | None = None
    json: bool = False
    """The content is a scripted ``json`` object (streamed in JSON fragments, not words)."""

    @property
    def says(self) -> bool:
        """It scripts the answer itself (not only the reasoning)."""
        return self.content is not None or bool(self.tool_calls) or self.web_search is not None


def _call(raw: Any, index: int) -> ScriptedCall:
    if not isinstance(raw, Mapping) or set(raw) - {"name", "arguments"}:
        raise ValueError(f'tool_calls[{index}] must be {{"name": …, "arguments": {{…}} or "…"}}')
    name, arguments = raw.get("name"), raw.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool_calls[{index}].name must be a non-empty string")
    if isinstance(arguments, Mapping):
        return ScriptedCall(name, orjson.dumps(arguments).decode())
    if isinstance(arguments, str):
        return ScriptedCall(name, arguments)
    raise ValueError(f"tool_calls[{index}].arguments must be an object or a string")


def parse_answer(raw: Any) -> ScriptedAnswer:
    """``{"content": "…"}`` → ``ScriptedAnswer``; ``ValueError`` saying what is wrong."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"an answer is an object with some of {', '.join(FIELDS)}, got {raw!r}")
    unknown = set(raw) - set(FIELDS)
    if unknown:
        raise ValueError(f"an answer takes no {', '.join(sorted(unknown))}; fields: {', '.join(FIELDS)}")
    for field in ("content", "reasoning", "web_search"):
        if field in raw and not isinstance(raw[field], str):
            raise ValueError(f"answer {field} must be a string")
    content = raw.get("content")
    if "json" in raw:
        if content is not None:
            raise ValueError("an answer has content or json, not both")
        if not isinstance(raw["json"], Mapping):
            raise ValueError("answer json must be an object")
        content = orjson.dumps(raw["json"]).decode()
    calls = raw.get("tool_calls", [])
    if not isinstance(calls, list):
        raise ValueError("answer tool_calls must be a list")
    search = raw.get("web_search")
    if search is not None and (not search or content is not None or calls):
        raise ValueError("web_search is a non-empty query, alone (no content, json or tool_calls)")
    return ScriptedAnswer(content, raw.get("reasoning"), tuple(_call(c, i) for i, c in enumerate(calls)), search,
                          "json" in raw)
