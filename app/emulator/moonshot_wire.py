"""What the Moonshot emulator writes on the wire: error bodies and texts, the deterministic reply,
``chat.completion`` bodies and SSE chunk frames (PROTOCOLS.md 4.3, 4.6).

Per-token chunks are assembled from precomputed bytes (``Reply`` once per configuration,
``Frames`` once per request): a chunk costs two concatenations, not a JSON encoding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
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


# --- tokens --------------------------------------------------------------------------------------


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                total += len(part["text"])
        return total
    return 0


def estimate_tokens(messages: Iterable[Any]) -> int:
    """A deterministic estimate: ceil(characters / 4) over the messages' text contents."""
    chars = 0
    for message in messages:
        if isinstance(message, Mapping):
            chars += _content_chars(message.get("content"))
    return math.ceil(chars / 4)


# --- the reply -------------------------------------------------------------------------------------

_ANSWER = ("Hello", "from", "the", "Moonshot", "emulator,", "a", "deterministic", "reply", "for", "testing",
           "the", "gateway.")
_THOUGHT = ("Let", "me", "think", "about", "this", "request", "step", "by", "step", "before", "answering.")


def _pieces(words: tuple[str, ...], count: int) -> list[str]:
    return [("" if i == 0 else " ") + words[i % len(words)] for i in range(count)]


class Reply:
    """The deterministic reply: one word per chunk and per completion token."""

    def __init__(self, reply_words: int, reasoning_words: int) -> None:
        self.content = _pieces(_ANSWER, reply_words)
        self.reasoning = _pieces(_THOUGHT, reasoning_words)
        content_deltas = [orjson.dumps({"content": piece}) for piece in self.content]
        reasoning_deltas = [orjson.dumps({"reasoning_content": piece}) for piece in self.reasoning]
        self.deltas = {False: content_deltas, True: reasoning_deltas + content_deltas}
        """Per-token delta objects, by ``thinking``."""

    def texts(self, thinking: bool, tokens: int) -> tuple[str, str]:
        """(reasoning, content) of the first ``tokens`` tokens."""
        reasoning = self.reasoning[:tokens] if thinking else []
        content = self.content[: max(0, tokens - len(reasoning))]
        return "".join(reasoning), "".join(content)


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass(slots=True)
class Identity:
    """What every chunk and body of one answer repeats."""

    id: str
    created: int
    model: str
    fingerprint: str


def completion_body(who: Identity, reasoning: str, content: str, finish: str, use: dict[str, int]) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
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

    def _event(self, choices: list[dict[str, Any]], use: dict[str, int] | None) -> bytes:
        who = self.who
        event: dict[str, Any] = {
            "id": who.id, "object": "chat.completion.chunk", "created": who.created, "model": who.model,
            "choices": choices, "system_fingerprint": who.fingerprint,
        }
        if use is not None:
            event["usage"] = use
        return b"data: " + orjson.dumps(event) + b"\n\n"

    def ending(self, finish: str, use: dict[str, int], position: str, include_usage: bool) -> bytes:
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
