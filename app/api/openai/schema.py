"""Parse and validate an OpenAI chat request body into a neutral ``ChatRequest`` and the *needs* it
implies (``app.capabilities``).

Accept everything real clients send (string or part-array content with unknown keys such as
``cache_control``, ``n`` as ``1.0``, ``stream_options``, ``max_completion_tokens``, Moonshot's
``thinking`` and ``partial``…); refuse what is wrong with a 400 that names the parameter. Every field is
either honoured, accepted as documented (``metadata``, ``store: false`` …), or refused: a field the gateway
cannot honour is a 400 ``unsupported_parameter``, an unknown one a 400 like OpenAI's, never silently
dropped. Every number is bounded.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from app.capabilities import needs_of
from app.errors import InvalidRequest, Unsupported
from app.upstreams.base import ChatRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_TOKENS = 1 << 20
"""The largest completion budget a request may ask for (Kimi's contexts are 256K)."""
MAX_DEPTH = 64
"""How deeply ``tools``, ``tool_choice`` and ``response_format`` may nest (JSON schemas are shallow)."""
_NUMBERS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
_PASSED = ("stop", "seed", "user", "parallel_tool_calls")
"""Fields passed on as they are (after their checks below)."""
_INERT = ("metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "modalities", "logit_bias")
"""Fields accepted with the values that ask nothing of the upstream (checked below)."""
_UNSUPPORTED = {
    "audio": "audio output", "prediction": "predicted outputs", "web_search_options": "OpenAI's web search",
    "functions": "the legacy 'functions' (use 'tools')", "function_call": "the legacy 'function_call' (use "
    "'tool_choice')", "verbosity": "'verbosity'",
}
KNOWN = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "tools",
    "tool_choice", "response_format", "reasoning_effort", "thinking", "logprobs", "top_logprobs",
    *_NUMBERS, *_PASSED, *_INERT, *_UNSUPPORTED,
})
EFFORTS = {"none": "none", "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "max",
           "max": "max"}
"""``reasoning_effort`` as clients send it → the level kimi-pool keeps (``none``: thinking off)."""
_PART_TYPES = frozenset({"text", "refusal", "image_url", "video_url"})
_SERVICE_TIERS = (None, "auto", "default")


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(name: str, value: Any, *, minimum: int = 1, maximum: int = MAX_TOKENS) -> int | None:
    if value is None:
        return None
    if _is_number(value) and float(value).is_integer() and minimum <= value <= maximum:
        return int(value)
    raise InvalidRequest(f"'{name}' must be a whole number from {minimum} to {maximum}, not {value!r}.", param=name)


def check_depth(name: str, value: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse a value nested more than ``limit`` levels deep (it could not be sent on)."""
    level: list[Any] = [value]
    for _ in range(limit):
        deeper: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                deeper.extend(v for v in item.values() if isinstance(v, dict | list))
            elif isinstance(item, list):
                deeper.extend(v for v in item if isinstance(v, dict | list))
        if not deeper:
            return
        level = deeper
    raise InvalidRequest(f"'{name}' is nested more than {limit} levels deep.", param=name)


def _content(where: str, role: str, content: Any) -> Any:
    if isinstance(content, str):
        return content
    if content is None:
        if role != "assistant":
            raise InvalidRequest(f"'{where}.content' is required for role {role}.", param=f"{where}.content")
        return None
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}.content' must be a string or an array of content parts.",
                             param=f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise InvalidRequest(f"'{where}.content[{j}]' must be a content part object.", param=f"{where}.content")
        if kind not in _PART_TYPES:
            raise Unsupported(f"Content parts of type {kind!r} are not supported ({where}.content[{j}]); "
                              "kimi-pool takes text, image_url and video_url parts.", param=f"{where}.content")
        if kind in ("text", "refusal") and not isinstance(part.get(kind), str):
            raise InvalidRequest(f"'{where}.content[{j}].{kind}' must be a string.", param=f"{where}.content")
        if kind in ("image_url", "video_url"):
            url = part.get(kind)
            if not (isinstance(url, dict) and isinstance(url.get("url"), str)) and not isinstance(url, str):
                raise InvalidRequest(f"'{where}.content[{j}].{kind}.url' must be a string.", param=f"{where}.content")
        parts.append(part)
    return parts


def _tool_calls(where: str, calls: Any) -> None:
    if not isinstance(calls, list):
        raise InvalidRequest(f"'{where}.tool_calls' must be an array.", param=f"{where}.tool_calls")
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments", ""), str) and isinstance(call.get("id", ""), str)):
            raise InvalidRequest(f"'{where}.tool_calls[{k}]' must be {{id, type: 'function', function: {{name, "
                                 "arguments (a JSON string)}}}}.", param=f"{where}.tool_calls")


def _message(index: int, message: Any, last: bool) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{where}' must be an object.", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequest(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}, not {role!r}.",
                             param=f"{where}.role")
    content = message.get("content")
    checked = _content(where, role, content)
    if checked is not content:
        message = {**message, "content": checked}
    if role == "assistant":
        if message.get("tool_calls") is not None:
            _tool_calls(where, message["tool_calls"])
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise InvalidRequest(f"'{where}.reasoning_content' must be a string.", param=f"{where}.reasoning_content")
        partial = message.get("partial")
        if partial is not None and not isinstance(partial, bool):
            raise InvalidRequest(f"'{where}.partial' must be a boolean.", param=f"{where}.partial")
        if partial and not last:
            raise InvalidRequest(f"'{where}.partial' is only allowed on the last message.", param=f"{where}.partial")
    elif role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidRequest(f"'{where}.tool_call_id' is required for role tool.", param=f"{where}.tool_call_id")
    if message.get("name") is not None and not isinstance(message["name"], str):
        raise InvalidRequest(f"'{where}.name' must be a string.", param=f"{where}.name")
    return message


def _tools(tools: Any) -> set[str]:
    """The names of the function tools, after checking their shape."""
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array of tool objects.", param="tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in ("function", "builtin_function") or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequest(f"'tools[{i}]' must be {{type: 'function', function: {{name, description, "
                                 "parameters}}}}.", param=f"tools[{i}]")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise InvalidRequest(f"'tools[{i}].function.parameters' must be a JSON schema object.",
                                 param=f"tools[{i}].function.parameters")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise InvalidRequest(f"'tools[{i}].function.description' must be a string.",
                                 param=f"tools[{i}].function.description")
        names.add(function["name"])
    check_depth("tools", tools)
    return names


def _tool_choice(choice: Any, names: set[str]) -> bool:
    """Whether the choice forces a tool call, after checking it."""
    if choice in ("none", "auto"):
        return False
    if choice == "required":
        return True
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and choice.get("type") == "function" and isinstance(function.get("name"), str):
        if function["name"] not in names:
            raise InvalidRequest(f"'tool_choice' names the function {function['name']!r}, which is not in 'tools'.",
                                 param="tool_choice")
        return True
    raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or {type: 'function', function: {name}}.",
                         param="tool_choice")


def _response_format(value: Any) -> None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return
    if kind == "json_schema":
        schema = value.get("json_schema")
        if not (isinstance(schema, dict) and isinstance(schema.get("name"), str)
                and isinstance(schema.get("schema", {}), dict)):
            raise InvalidRequest("'response_format.json_schema' must be {name, schema, strict}.",
                                 param="response_format.json_schema")
        check_depth("response_format", value)
        return
    raise InvalidRequest("'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                         param="response_format")


def parse_thinking(thinking: Any, effort: Any) -> tuple[bool | None, str | None]:
    """(thinking on/off/upstream default, effort level) from ``thinking`` and ``reasoning_effort``."""
    on: bool | None = None
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled") or set(thinking) - {"type"}:
            raise InvalidRequest("'thinking' must be {\"type\": \"enabled\"} or {\"type\": \"disabled\"}.",
                                 param="thinking")
        on = kind == "enabled"
    if effort is None:
        return on, None
    level = EFFORTS.get(effort) if isinstance(effort, str) else None
    if level is None:
        raise InvalidRequest(f"'reasoning_effort' must be one of {', '.join(EFFORTS)}, not {effort!r}.",
                             param="reasoning_effort")
    wants = level != "none"
    if on is not None and on != wants:
        raise InvalidRequest(f"'thinking' ({thinking['type']}) and 'reasoning_effort' ({effort}) disagree; send one.",
                             param="reasoning_effort")
    return wants, level if wants else None


def _inert(body: dict[str, Any]) -> None:
    """Refuse the accepted-but-inert fields when they ask for something."""
    if body.get("store"):
        raise Unsupported("'store: true' is not supported: kimi-pool does not keep chat completions.", param="store")
    if body.get("service_tier") not in _SERVICE_TIERS:
        raise Unsupported("'service_tier' other than 'auto' or 'default' is not supported.", param="service_tier")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise Unsupported("Only the 'text' modality is supported.", param="modalities")
    if body.get("logit_bias"):
        raise Unsupported("'logit_bias' is not supported by the Kimi upstreams.", param="logit_bias")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InvalidRequest("'metadata' must be an object of strings.", param="metadata")
    for name in ("prompt_cache_key", "safety_identifier"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise InvalidRequest(f"'{name}' must be a string.", param=name)


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = body.keys() - KNOWN
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name,
                             code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
    last = len(messages) - 1
    checked = [_message(i, m, i == last) for i, m in enumerate(messages)]

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))

    max_tokens = _whole("max_completion_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = _whole("max_tokens", body.get("max_tokens"))
    n = _whole("n", body.get("n"), maximum=128)
    if n is not None and n != 1:
        raise Unsupported("Only n=1 is supported: ask again for another choice.", param="n")
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        name = "logprobs" if body.get("logprobs") else "top_logprobs"
        raise Unsupported("Log probabilities are not supported by kimi-pool.", param=name)
    for name, what in _UNSUPPORTED.items():
        if body.get(name) is not None:
            raise Unsupported(f"{what[0].upper() + what[1:]} is not supported by kimi-pool.", param=name)
    _inert(body)

    params: dict[str, Any] = {}
    for name, (low, high) in _NUMBERS.items():
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not low <= value <= high:
            raise InvalidRequest(f"'{name}' must be a number between {low:g} and {high:g}.", param=name)
        params[name] = value
    for name in _PASSED:
        if body.get(name) is not None:
            params[name] = body[name]
    stop = params.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 16 and
                                                            all(isinstance(s, str) for s in stop))):
        raise InvalidRequest("'stop' must be a string or an array of up to 16 strings.", param="stop")
    seed = params.get("seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and -(2**63) <= seed < 2**63):
        raise InvalidRequest("'seed' must be a whole number within 64 bits.", param="seed")
    if "user" in params and not isinstance(params["user"], str):
        raise InvalidRequest("'user' must be a string.", param="user")
    if "parallel_tool_calls" in params and not isinstance(params["parallel_tool_calls"], bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls")

    thinking, effort = parse_thinking(body.get("thinking"), body.get("reasoning_effort"))
    tools = body.get("tools")
    choice = body.get("tool_choice")
    names: set[str] = set()
    if tools is not None:
        names = _tools(tools)
        params["tools"] = tools
    if choice is not None:
        if _tool_choice(choice, names) and not tools:
            raise InvalidRequest("'tool_choice' forces a tool call but 'tools' is empty.", param="tool_choice")
        params["tool_choice"] = choice
    response_format = body.get("response_format")
    if response_format is not None:
        _response_format(response_format)
        params["response_format"] = response_format
    return ChatRequest(model=model, messages=checked, stream=bool(stream), include_usage=include_usage,
                       max_tokens=max_tokens, params=params, needs=needs_of(checked, params, thinking),
                       thinking=thinking, effort=effort, session_hint=body.get("prompt_cache_key"))
