"""Neutral events → Anthropic's message: one JSON body (``message_body``) or the event stream
(``EventStream``).

The stream is exactly Anthropic's sequence: ``message_start``; per content block ``content_block_start``,
its deltas (``thinking_delta`` then ``signature_delta``, ``text_delta``, ``input_json_delta``) and
``content_block_stop``; a ``ping`` after the first block starts; ``message_delta`` (stop reason and usage);
``message_stop``. Blocks come in the order the upstream produces them (thinking, text, tool calls), a new
kind closing the one before. A thinking block's signature is kimi-pool's (``sign``), issued when the block
closes, over its whole text.

Usage: Anthropic's ``input_tokens`` excludes the cached prompt tokens, which are ``cache_read_input_tokens``;
``message_start`` carries the prompt estimate, ``message_delta`` the upstream's counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

from app.api.anthropic.content import tool_use_id
from app.upstreams.base import Completion, Delta, Event, Finish, Usage

log = logging.getLogger("kimi_pool.api")
Sign = Callable[[str], str]
"""Thinking text → its signature."""
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
PING = b'event: ping\ndata: {"type":"ping"}\n\n'
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'


_USAGE_REST = {"cache_creation": None, "inference_geo": None, "output_tokens_details": None, "server_tool_use": None,
               "service_tier": "standard"}


def usage_body(usage: Usage | None, estimate: int = 0) -> dict[str, Any]:
    if usage is None:
        return {"input_tokens": estimate, "output_tokens": 0, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0, **_USAGE_REST}
    cached = usage.cached_tokens or 0
    return {"input_tokens": max(0, usage.prompt_tokens - cached), "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached, **_USAGE_REST}


def stop_reason(finish: str | None, called: bool) -> str:
    reason = STOP_REASONS.get(finish or "stop", "end_turn")
    return "tool_use" if called and reason == "end_turn" else reason


def _input(arguments: str) -> dict[str, Any]:
    try:
        value = orjson.loads(arguments) if arguments else {}
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        log.warning("a tool call's arguments are not a JSON object; sent as {}: %.200s", arguments)
        return {}
    return value


def message_body(completion: Completion, message_id: str, model: str, sign: Sign) -> dict[str, Any]:
    """A whole answer as Anthropic's ``message`` object."""
    content: list[dict[str, Any]] = []
    if completion.reasoning:
        content.append({"type": "thinking", "thinking": completion.reasoning, "signature": sign(completion.reasoning)})
    if completion.content:
        content.append({"type": "text", "text": completion.content, "citations": None})
    for call in completion.tool_calls or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": tool_use_id(str(call.get("id") or "")),
                        "name": function.get("name") or "", "input": _input(function.get("arguments") or ""),
                        "caller": {"type": "direct"}})
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason(completion.finish_reason, bool(completion.tool_calls)),
            "stop_sequence": None, "stop_details": None, "container": None, "usage": usage_body(completion.usage)}


def _event(name: bytes, payload: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class EventStream:
    """Renders one answer's events; ``start``, then ``events`` per batch, then ``end``."""

    __slots__ = ("_calls", "_finish", "_index", "_message_id", "_model", "_open", "_pinged", "_sign", "_thinking",
                 "_usage", "estimate")

    def __init__(self, message_id: str, model: str, sign: Sign, estimate: int) -> None:
        self._message_id = message_id
        self._model = model
        self._sign = sign
        self.estimate = estimate
        self._index = -1
        self._open: str | None = None
        """The kind of the open block: ``thinking``, ``text``, ``tool_use`` (None: none open)."""
        self._thinking: list[str] = []
        self._calls: dict[int, int] = {}
        """The upstream's tool-call index → its block index."""
        self._pinged = False
        self._finish: str | None = None
        self._usage: Usage | None = None

    def start(self) -> bytes:
        message: dict[str, Any] = {"id": self._message_id, "type": "message", "role": "assistant", "model": self._model,
                   "content": [], "stop_reason": None, "stop_sequence": None, "stop_details": None,
                   "container": None, "usage": usage_body(None, self.estimate)}
        return _event(b"message_start", {"type": "message_start", "message": message})

    def _begin(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        self._index += 1
        self._open = kind
        out.append(_event(b"content_block_start", {"type": "content_block_start", "index": self._index,
                                                   "content_block": block}))
        if not self._pinged:
            self._pinged = True
            out.append(PING)

    def _close(self, out: list[bytes]) -> None:
        if self._open is None:
            return
        index = b"%d" % self._index
        if self._open == "thinking":
            signature = self._sign("".join(self._thinking))
            self._thinking = []
            out.append(_DELTA + index + b',"delta":{"type":"signature_delta","signature":' + orjson.dumps(signature)
                       + b"}}\n\n")
        out.append(b'event: content_block_stop\ndata: {"type":"content_block_stop","index":' + index + b"}\n\n")
        self._open = None

    def events(self, batch: list[Event]) -> bytes:
        out: list[bytes] = []
        for event in batch:
            if type(event) is Delta:
                if event.reasoning:
                    if self._open != "thinking":
                        self._begin("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
                    self._thinking.append(event.reasoning)
                    out.append(_DELTA + b"%d" % self._index + b',"delta":{"type":"thinking_delta","thinking":'
                               + orjson.dumps(event.reasoning) + b"}}\n\n")
                if event.content:
                    if self._open != "text":
                        self._begin("text", {"type": "text", "text": "", "citations": None}, out)
                    out.append(_DELTA + b"%d" % self._index + b',"delta":{"type":"text_delta","text":'
                               + orjson.dumps(event.content) + b"}}\n\n")
                if event.tool_calls:
                    self._tool_calls(event.tool_calls, out)
            elif type(event) is Finish:
                self._finish = event.reason
            elif type(event) is Usage:
                self._usage = event
        return b"".join(out)

    def _tool_calls(self, calls: list[dict[str, Any]], out: list[bytes]) -> None:
        for call in calls:
            number = call.get("index", 0)
            function = call.get("function") or {}
            if number not in self._calls:
                call_id = call.get("id") or f"call_{self._message_id}_{number}"
                self._begin("tool_use", {"type": "tool_use", "id": tool_use_id(str(call_id)),
                                         "name": function.get("name") or "", "input": {},
                                         "caller": {"type": "direct"}}, out)
                self._calls[number] = self._index
            elif self._calls[number] != self._index or self._open != "tool_use":
                log.warning("tool call %s continued after another block began; its fragment is dropped", number)
                continue
            arguments = function.get("arguments")
            if arguments:
                out.append(_DELTA + b"%d" % self._index + b',"delta":{"type":"input_json_delta","partial_json":'
                           + orjson.dumps(arguments) + b"}}\n\n")

    def end(self) -> bytes:
        out: list[bytes] = []
        self._close(out)
        if not self._pinged:
            out.append(PING)
        delta = {"stop_reason": stop_reason(self._finish, bool(self._calls)), "stop_sequence": None,
                 "stop_details": None}
        out.append(_event(b"message_delta", {"type": "message_delta", "delta": delta,
                                             "usage": usage_body(self._usage, self.estimate)}))
        out.append(MESSAGE_STOP)
        return b"".join(out)
