"""What the Moonshot emulator writes on the wire: error bodies and texts, usage, ``chat.completion``
bodies and SSE chunk frames (PROTOCOLS.md 4.3, 4.6).

Per-token chunks are assembled from precomputed bytes (a ``Turn``'s deltas, ``Frames`` once per
request): a chunk costs two concatenations, not a JSON encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson

Headers = tuple[tuple[bytes, bytes], ...]
JSON_HEADERS: Headers = ((b"content-type", b"application/json"),)
SSE_HEADERS: Headers = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"))
HTML_HEADERS: Headers = ((b"content-type", b"text/html"),)
DONE = b"data: [DONE]\n\n"

GATEWAY_TIMEOUT_PAGE = (
    b"<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    b"<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)

# --- error texts (PROTOCOLS.md 4.6) ----------------------------------------------------------------

INVALID_AUTH = "Invalid Authentication"
OVERLOADED = "The engine is currently overloaded, please try again later"
INSUFFICIENT_BALANCE = (
    "Your account is suspended due to insufficient balance, please recharge your account "
    "or check your plan and billing details"
)
EXCEEDED_QUOTA = "You exceeded your current quota, please check your plan and billing details"
SERVER_ERROR = "An internal error occurred, please try again later"
STREAM_ERROR = "The server had an error while processing your request, please try again later"
RATE_LIMIT_DEFAULTS = MappingProxyType({"concurrency": 1, "rpm": 3, "tpm": 500_000, "tpd": 1_500_000})
"""Limits quoted by scripted rate limits for organizations without one (Tier0)."""


def error_body(type_: str, message: str) -> bytes:
    return orjson.dumps({"error": {"type": type_, "message": message}})


def model_not_found(model: str) -> str:
    return f"Not found the model {model} or Permission denied"


def rate_limit_message(who: str, bucket: str, limit: int, current: int, wait: int) -> str:
    """The ``rate_limit_reached_error`` text of one bucket, with the seconds to wait in it."""
    if bucket == "concurrency":
        what = f"request reached max organization concurrency: {limit}"
    elif bucket == "rpm":
        what = f"request reached organization max RPM: {limit}"
    else:
        what = f"request reached organization {bucket.upper()} rate limit, current: {current}, limit: {limit}"
    return f"Your account {who} {what}, please try again after {wait} seconds"


def invalid_request(details: str) -> str:
    return f"Invalid request: {details}"


def context_exceeded(context_length: int) -> str:
    return f"Your request exceeded model token limit : {context_length}"


# Thinking and tools (PROTOCOLS.md 4.2). These three are Kimi's words as public issue threads quote
# them (continuedev/continue#11527, 9router#1480 …); the other rules' texts are the emulator's own,
# "Invalid request: …" like the documented ones, since Kimi's wording for them is not known.
REQUIRED_WITH_THINKING = "tool_choice 'required' is incompatible with thinking enabled"
NAMED_WITH_THINKING = "tool_choice specified is incompatible with thinking enabled"


def reasoning_missing(index: int) -> str:
    return f"thinking is enabled but reasoning_content is missing in assistant tool call message at index {index}"


# --- bodies ----------------------------------------------------------------------------------------


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """Kimi's usage object; a prompt-cache hit adds ``cached_tokens`` at the top and in the OpenAI place."""
    use: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if cached:
        use["cached_tokens"] = cached
        use["prompt_tokens_details"] = {"cached_tokens": cached}
    return use


@dataclass(slots=True)
class Identity:
    """What every chunk and body of one answer repeats."""

    id: str
    created: int
    model: str
    fingerprint: str


def completion_body(who: Identity, message: dict[str, Any], finish: str, use: dict[str, Any]) -> bytes:
    return orjson.dumps({
        "id": who.id,
        "object": "chat.completion",
        "created": who.created,
        "model": who.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": use,
        "system_fingerprint": who.fingerprint,
    })


class Frames:
    """SSE frames of one streamed answer."""

    __slots__ = ("_head", "_tail", "who")

    def __init__(self, who: Identity) -> None:
        self.who = who
        self._head = b"".join((
            b'data: {"id":"', who.id.encode(), b'","object":"chat.completion.chunk","created":',
            str(who.created).encode(), b',"model":', orjson.dumps(who.model),
            b',"choices":[{"index":0,"delta":',
        ))
        self._tail = b',"finish_reason":null}],"system_fingerprint":"' + who.fingerprint.encode() + b'"}\n\n'

    def chunk(self, delta: bytes) -> bytes:
        return self._head + delta + self._tail

    def role(self) -> bytes:
        return self.chunk(b'{"role":"assistant","content":""}')

    def _event(self, choices: list[dict[str, Any]], use: dict[str, Any] | None) -> bytes:
        who = self.who
        event: dict[str, Any] = {
            "id": who.id, "object": "chat.completion.chunk", "created": who.created, "model": who.model,
            "choices": choices, "system_fingerprint": who.fingerprint,
        }
        if use is not None:
            event["usage"] = use
        return b"data: " + orjson.dumps(event) + b"\n\n"

    def ending(self, finish: str, use: dict[str, Any], position: str, include_usage: bool) -> bytes:
        """The final chunk, the ``include_usage`` chunk if asked for, and ``[DONE]``."""
        choice: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": finish}
        if position != "top":
            choice["usage"] = use
        parts = [self._event([choice], use if position != "choice" else None)]
        if include_usage:
            parts.append(self._event([], use))
        parts.append(DONE)
        return b"".join(parts)


def error_event(type_: str, message: str) -> bytes:
    return b"data: " + error_body(type_, message) + b"\n\n"
