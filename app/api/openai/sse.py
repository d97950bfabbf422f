"""Render neutral events as OpenAI ``chat.completion.chunk`` SSE, and serve them; and a whole answer
as one ``chat.completion`` body (``completion_body``).

The contract: one ``id`` and ``created`` for the whole stream; the first chunk carries
``role: "assistant"``; exactly one ``finish_reason``; with ``include_usage`` a last chunk with
``choices: []`` and the usage; ``data: [DONE]`` at the end. A failure after the stream began ends it
with a ``data: {"error": {...}}`` event.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from app.errors import KimiPoolError
from app.upstreams.base import Completion, Delta, Event, Finish, Usage

log = logging.getLogger("kimi_pool.sse")
DONE = b"data: [DONE]\n\n"


def _frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ChunkRenderer:
    __slots__ = ("_head", "_tail", "created", "id", "model")

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.id = completion_id
        self.created = created
        self.model = model
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        # every chunk shares this prefix; only the choices differ
        self._head = b"data: " + orjson.dumps(head)[:-1] + b',"choices":'
        self._tail = b"}\n\n"

    def _choice(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._head + orjson.dumps([{"index": 0, "delta": delta, "finish_reason": finish}]) + self._tail

    def role(self) -> bytes:
        return self._choice({"role": "assistant", "content": ""})

    def event(self, event: Event) -> bytes | None:
        if type(event) is Delta:
            delta: dict[str, Any] = {}
            if event.reasoning is not None:
                delta["reasoning_content"] = event.reasoning
            if event.content is not None:
                delta["content"] = event.content
            if event.tool_calls is not None:
                delta["tool_calls"] = event.tool_calls
            return self._choice(delta)
        if type(event) is Finish:
            return self._choice({}, event.reason)
        return None

    def usage(self, usage: Usage) -> bytes:
        return self._head + b'[],"usage":' + orjson.dumps(usage.as_openai()) + self._tail

    @staticmethod
    def error(error: KimiPoolError) -> bytes:
        return _frame(error.body())


def completion_body(completion: Completion, completion_id: str, created: int, model: str) -> dict[str, Any]:
    """A whole answer as an OpenAI ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": completion.content, "refusal": None}
    if completion.reasoning is not None:
        message["reasoning_content"] = completion.reasoning
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason, "logprobs": None}],
    }
    if completion.usage is not None:
        body["usage"] = completion.usage.as_openai()
    return body
