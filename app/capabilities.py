"""What a request needs of the upstream, and what each upstream kind (and model) can do. Pure data.

A request's *needs* are derived once, when it is parsed (any front-end: they all produce the same
neutral ``ChatRequest``). The scheduler only considers accounts whose kind and model can serve all of
them; failover and session migration obey the same rule. When no enabled account can, the request is
refused with a 400 that names the parameter — never served silently without what it asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from app.accounts_config import ACCOUNT_KINDS, DEFAULT_MODELS
from app.kimi_models import moonshot_traits

TOOLS = "tools"
FORCED_TOOL = "forced_tool"
"""``tool_choice`` ``required`` or a named function."""
FORCED_TOOL_THINKING = "forced_tool_thinking"
"""A forced tool choice on a turn that asked to think."""
THINKING = "thinking"
NO_THINKING = "no_thinking"
"""Thinking explicitly turned off: a model that always thinks cannot serve it."""
JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"
IMAGES = "images"
VIDEO = "video"
PARTIAL = "partial"
"""Kimi's prefix mode: the answer continues a last assistant message marked ``partial``."""

PARAMS = {
    TOOLS: "tools", FORCED_TOOL: "tool_choice", FORCED_TOOL_THINKING: "tool_choice", THINKING: "reasoning_effort",
    NO_THINKING: "reasoning_effort", JSON_OBJECT: "response_format",
    JSON_SCHEMA: "response_format", IMAGES: "messages", VIDEO: "messages", PARTIAL: "messages",
}
"""The (OpenAI) parameter each need comes from, for error messages."""

DESCRIPTIONS = {
    TOOLS: "tool calls", FORCED_TOOL: "a forced tool choice",
    FORCED_TOOL_THINKING: "a forced tool choice while thinking", THINKING: "thinking",
    NO_THINKING: "thinking turned off", JSON_OBJECT: "JSON output",
    JSON_SCHEMA: "JSON-schema output", IMAGES: "image input", VIDEO: "video input",
    PARTIAL: "a partial (prefilled) assistant message",
}

_MOONSHOT_ALWAYS = frozenset({TOOLS, JSON_OBJECT, JSON_SCHEMA, PARTIAL})
_WEB_THINKING = frozenset({THINKING})


def capabilities(kind: str, upstream_model: str) -> frozenset[str]:
    """What an account of ``kind`` can do when it serves ``upstream_model``."""
    if kind == "moonshot":
        traits = moonshot_traits(upstream_model)
        can = set(_MOONSHOT_ALWAYS)
        if traits.thinking != "always":
            can.add(NO_THINKING)
            can.add(FORCED_TOOL)  # thinking off for that turn when it is on by default
        if traits.thinking != "none":
            can.add(THINKING)
        if traits.forced_tool_while_thinking:
            can |= {FORCED_TOOL, FORCED_TOOL_THINKING}
        if traits.vision:
            can |= {IMAGES, VIDEO}
        return frozenset(can)
    if kind == "kimi-web":  # kimi.com's chat: thinking with effort levels; text in, text out
        return _WEB_THINKING if upstream_model.endswith("-thinking") else _WEB_THINKING | {NO_THINKING}
    return frozenset({NO_THINKING})  # kimi-ai-chat: one flattened text prompt, one text answer


_PART_NEEDS = {"image_url": IMAGES, "video_url": VIDEO}


def needs_of(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any], thinking: bool | None) -> frozenset[str]:
    """What a request asks of the upstream, from its (OpenAI-shaped) messages and parameters and whether it
    asked to think: the one derivation every front-end uses, once, when it parses a request."""
    needs: set[str] = set()
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                need = _PART_NEEDS.get(str(part.get("type"))) if isinstance(part, Mapping) else None
                if need is not None:
                    needs.add(need)
    if messages and messages[-1].get("role") == "assistant" and messages[-1].get("partial"):
        needs.add(PARTIAL)
    if thinking:
        needs.add(THINKING)
    elif thinking is False:
        needs.add(NO_THINKING)
    tools = params.get("tools")
    choice = params.get("tool_choice")
    if tools and choice != "none":
        needs.add(TOOLS)
        if choice == "required" or isinstance(choice, Mapping):
            needs.add(FORCED_TOOL_THINKING if thinking else FORCED_TOOL)
    response_format = params.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind in (JSON_OBJECT, JSON_SCHEMA):
        needs.add(kind)
    return frozenset(needs)


def kinds_able(needs: frozenset[str]) -> list[str]:
    """The account kinds that can serve ``needs`` with at least one of their usual models."""
    return [kind for kind in ACCOUNT_KINDS if any(needs <= capabilities(kind, m) for m in DEFAULT_MODELS[kind])]


def describe(needs: Iterable[str]) -> str:
    return ", ".join(DESCRIPTIONS.get(need, need) for need in sorted(needs))


def first_param(needs: Iterable[str]) -> str | None:
    for need in sorted(needs):
        if need in PARAMS:
            return PARAMS[need]
    return None
