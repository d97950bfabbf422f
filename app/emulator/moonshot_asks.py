"""What a chat request asks of the Moonshot emulator beyond plain text — thinking, tools, a tool
choice, a response format, prefix mode, a tool result — checked against the model's traits and
Kimi's rules (PROTOCOLS.md 4.2), the ones coding agents trip on.

``read_asks`` returns a problem text (answered as a 400 ``invalid_request_error``) or the ``Asks``.
The checks run in this order: thinking switches (``thinking`` / ``reasoning_effort``, then the
model's trait), tools, ``tool_choice``, a forced tool choice with thinking on, ``response_format``,
then the history (assistant tool calls without ``reasoning_content`` while thinking). Image parts
on a model without vision are checked with the prompt estimate (``moonshot_prompt``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from app.emulator import moonshot_wire as wire
from app.emulator.moonshot_config import ModelInfo

AGENT_FIELDS = frozenset(("tools", "tool_choice", "thinking", "reasoning_effort", "response_format"))
"""Body fields that take a request off the plain path."""
MAX_TOOLS = 128
WEB_SEARCH = "$web_search"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: Any


@dataclass(slots=True)
class Asks:
    thinking: bool
    effort: str | None = None
    functions: tuple[Tool, ...] = ()
    web_search: bool = False
    """The builtin ``$web_search`` is offered."""
    tools_json: bytes | None = None
    """The tools as sent, for the prompt estimate and the cache key."""
    choice: str = "auto"
    """``auto``, ``none``, ``required``, or ``function`` (then ``forced`` names it)."""
    forced: str | None = None
    response: str = "text"
    """``text``, ``json_object`` or ``json_schema`` (then ``schema``)."""
    schema: Any = None
    partial: str | None = None
    """The content of a last assistant message with ``partial: true`` (prefix mode)."""
    after_tool: bool = False
    """The last message is a tool result."""
    search_id: str | None = None
    """The ``$web_search`` search id a tool result echoes back."""

    @property
    def plain(self) -> bool:
        """Nothing but (maybe) thinking at the default effort: the precomputed answer fits."""
        return (not self.functions and not self.web_search and self.response == "text" and self.partial is None
                and not self.after_tool and self.effort is None)


def _thinking(body: Mapping[str, Any], name: str, model: ModelInfo) -> tuple[str, bool, str | None]:
    thinking = body.get("thinking")
    effort = body.get("reasoning_effort")
    if thinking is not None and effort is not None:
        return "thinking and reasoning_effort cannot be set together; send one of them", False, None
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, Mapping) else None
        if kind not in ("enabled", "disabled"):
            return 'thinking must be {"type": "enabled"} or {"type": "disabled"}', False, None
        on = kind == "enabled"
    elif effort is not None and model.efforts:
        if effort not in model.efforts:
            return f"reasoning_effort must be one of {', '.join(model.efforts)}", False, None
        on = True
    else:  # a model without effort levels ignores reasoning_effort, as Moonshot does
        on = model.thinking != "none"
        effort = None
    if on and model.thinking == "none":
        return f"thinking is not supported by model {name}", False, None
    if not on and model.thinking == "always":
        return f"thinking cannot be disabled for model {name}", False, None
    return "", on, effort


def _tools(raw: Any, asks: Asks) -> str:
    if not isinstance(raw, list):
        return "tools must be an array"
    if len(raw) > MAX_TOOLS:
        return f"too many tools: {len(raw)}, at most {MAX_TOOLS} are allowed"
    functions = []
    for index, tool in enumerate(raw):
        where = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            return f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
        kind, name = tool.get("type"), function["name"]
        if kind == "builtin_function":
            if name != WEB_SEARCH:
                return f"{where}: unknown builtin function {name!r}; the builtin is {WEB_SEARCH}"
            asks.web_search = True
            continue
        if kind != "function":
            return f"{where}.type must be function or builtin_function"
        if not _NAME.fullmatch(name):
            return f"{where}.function.name must be 1-64 letters, digits, _ or -, not starting with a digit"
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            return f"{where}.function.parameters must be a JSON Schema object"
        if function.get("description") is not None and not isinstance(function["description"], str):
            return f"{where}.function.description must be a string"
        functions.append(Tool(name, parameters))
    asks.functions = tuple(functions)
    asks.tools_json = orjson.dumps(raw) if raw else None
    return ""


def _choice(raw: Any, asks: Asks) -> str:
    if raw in ("auto", "none", "required"):
        asks.choice = raw
        return ""
    function = raw.get("function") if isinstance(raw, Mapping) and raw.get("type") == "function" else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        return 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": …}}'
    if function["name"] not in {tool.name for tool in asks.functions}:
        return f"tool_choice names function {function['name']!r}, which is not among the tools"
    asks.choice, asks.forced = "function", function["name"]
    return ""


def _response_format(raw: Any, asks: Asks) -> str:
    kind = raw.get("type") if isinstance(raw, Mapping) else None
    if kind not in ("text", "json_object", "json_schema"):
        return "response_format.type must be text, json_object or json_schema"
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            return 'response_format json_schema needs {"json_schema": {"name": …, "schema": {…}}}'
        asks.schema = spec["schema"]
    asks.response = kind
    return ""


def _last(messages: list[Any], asks: Asks) -> None:
    last = messages[-1]
    role = last.get("role")
    if role == "assistant" and last.get("partial") is True:
        content = last.get("content")
        asks.partial = content if isinstance(content, str) else ""
    elif role == "tool":
        asks.after_tool = True
        content = last.get("content")
        if isinstance(content, str) and "search_result" in content:
            try:
                result = orjson.loads(content).get("search_result")
            except (orjson.JSONDecodeError, AttributeError):
                return
            if isinstance(result, Mapping) and isinstance(result.get("search_id"), str):
                asks.search_id = result["search_id"]


def read_asks(body: Mapping[str, Any], name: str, model: ModelInfo, messages: list[Any]) -> tuple[str, Asks | None]:
    """(the 400's message, None) or ("", the request's asks), in the order the module docstring gives."""
    problem, on, effort = _thinking(body, name, model)
    if problem:
        return wire.invalid_request(problem), None
    asks = Asks(on, effort)
    tools = body.get("tools")
    if tools is not None and (problem := _tools(tools, asks)):
        return wire.invalid_request(problem), None
    choice = body.get("tool_choice")
    if choice is not None and (problem := _choice(choice, asks)):
        return wire.invalid_request(problem), None
    if on and asks.choice in ("required", "function") and not model.forced_tools_with_thinking:
        return (wire.REQUIRED_WITH_THINKING if asks.choice == "required" else wire.NAMED_WITH_THINKING), None
    response_format = body.get("response_format")
    if response_format is not None and (problem := _response_format(response_format, asks)):
        return wire.invalid_request(problem), None
    if on:
        for index, message in enumerate(messages):
            if message.get("role") == "assistant" and message.get("tool_calls") \
                    and message.get("reasoning_content") is None:
                return wire.reasoning_missing(index), None
    _last(messages, asks)
    return "", asks
