"""Parse and validate an OpenAI chat request body into a neutral ``ChatRequest``.

Accept everything real clients send (string or part-array content with unknown keys, ``n`` as
``1.0``, ``stream_options``, ``max_completion_tokens``…); refuse what is wrong with a 400 that names
the parameter.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from app.errors import InvalidRequest
from app.upstreams.base import ChatRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_NUMBERS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
_OBJECTS_OR_STRINGS = ("tool_choice",)
_KEPT = ("tools", "tool_choice", "response_format", "stop", "seed", "user", "parallel_tool_calls", "logprobs",
         "top_logprobs")


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(name: str, value: Any, *, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if _is_number(value) and float(value).is_integer() and value >= minimum:
        return int(value)
    raise InvalidRequest(f"'{name}' must be a whole number of at least {minimum}, not {value!r}.", param=name)


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{where}' must be an object.", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}, not {role!r}.",
                             param=f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, str):
                continue
            if not isinstance(part, dict) or not isinstance(part.get("type", "text"), str):
                raise InvalidRequest(f"'{where}.content[{j}]' must be a content part object.",
                                     param=f"{where}.content")
            if part.get("type", "text") == "text" and not isinstance(part.get("text"), str):
                raise InvalidRequest(f"'{where}.content[{j}].text' must be a string.", param=f"{where}.content")
        message = {**message, "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in content]}
    elif content is None:
        if role != "assistant":
            raise InvalidRequest(f"'{where}.content' is required for role {role}.", param=f"{where}.content")
    elif not isinstance(content, str):
        raise InvalidRequest(f"'{where}.content' must be a string or an array of content parts.",
                             param=f"{where}.content")
    return message


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
    checked = [_message(i, m) for i, m in enumerate(messages)]

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
    n = _whole("n", body.get("n"))
    if n is not None and n != 1:
        raise InvalidRequest("Only n=1 is supported.", param="n")

    params: dict[str, Any] = {}
    for name, (low, high) in _NUMBERS.items():
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not low <= value <= high:
            raise InvalidRequest(f"'{name}' must be a number between {low:g} and {high:g}.", param=name)
        params[name] = value
    for name in _KEPT:
        if body.get(name) is not None:
            params[name] = body[name]
    stop = params.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and
                                                            all(isinstance(s, str) for s in stop))):
        raise InvalidRequest("'stop' must be a string or an array of strings.", param="stop")
    tools = params.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise InvalidRequest("'tools' must be an array of tool objects.", param="tools")
    for name in _OBJECTS_OR_STRINGS:
        if name in params and not isinstance(params[name], str | dict):
            raise InvalidRequest(f"'{name}' must be a string or an object.", param=name)
    if "response_format" in params and not isinstance(params["response_format"], dict):
        raise InvalidRequest("'response_format' must be an object.", param="response_format")
    if "user" in params and not isinstance(params["user"], str):
        raise InvalidRequest("'user' must be a string.", param="user")
    return ChatRequest(model=model, messages=checked, stream=bool(stream), include_usage=include_usage,
                       max_tokens=max_tokens, params=params)
