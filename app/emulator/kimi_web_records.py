"""The kimi.com web emulator's records: chats and messages, counters, and the verdicts on a request.

``parse_chat`` reads a Chat request body (snake_case or camelCase, as clients send either);
``Answer`` is an immediate reply (an HTTP error, a unary body or a lone end-of-stream frame) and
``Ticket`` an admitted turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.emulator import kimi_web_wire as wire
from app.emulator.control import Outcome
from app.emulator.kimi_web_config import is_count

# --- chats ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    id: str
    parent_id: str
    role: str
    content: str
    scenario: str
    status: str
    created: float
    think: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_wire(self) -> dict[str, Any]:
        """As ``ListMessages`` returns it."""
        blocks = []
        if self.think:
            blocks.append({"id": "0", "think": {"content": self.think}})
        if self.content:
            blocks.append({"id": "1", "text": {"content": self.content}})
        return {"id": self.id, "parentId": self.parent_id, "role": self.role, "status": self.status,
                "scenario": self.scenario, "createTime": wire.iso(self.created), "blocks": blocks}


@dataclass(slots=True)
class Chat:
    id: str
    owner: str
    created: float
    name: str = ""
    messages: list[Message] = field(default_factory=list)
    activity: int = 0
    """When the chat last had a turn, as a sequence number: ``ListChats`` shows the latest first."""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "owner": self.owner, "name": self.name, "created": self.created,
                "messages": [message.to_dict() for message in self.messages]}


# --- counters ------------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamCounters:
    """Chat counters, kept per user and in total."""

    chat_requests: int = 0
    """Chat requests seen, whatever their answer (per user: those whose token names the user)."""
    by_code: dict[str, int] = field(default_factory=dict)
    """How answers ended, by Connect code: ``ok`` for a clean end-of-stream, else the error's code
    however it was signalled (end-of-stream frame, HTTP status, or a ``status``-mode usage limit).
    Answers with no end at all are counted in ``dropped`` and ``client_disconnects`` instead."""
    in_flight: int = 0
    peak_in_flight: int = 0
    turns: int = 0
    """Turns admitted (and charged to the quota)."""
    completed_streams: int = 0
    """Replies delivered in full: ``done`` and a clean end-of-stream frame."""
    dropped: int = 0
    """Streams the emulator cut on purpose (``drop_after``, ``drop_before_end``)."""
    client_disconnects: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def count(self, code: str) -> None:
        self.by_code[code] = self.by_code.get(code, 0) + 1


@dataclass(slots=True)
class KimiWebStats(StreamCounters):
    """Totals (the inherited fields), the unary calls, and ``users``: the same counters per user."""

    chats_created: int = 0
    chats_deleted: int = 0
    delete_calls: int = 0
    """DeleteChat and BatchDeleteChats calls, whatever their answer."""
    list_calls: int = 0
    """ListChats and ListMessages calls."""
    subscription_calls: int = 0
    users: dict[str, StreamCounters] = field(default_factory=dict)


def zero_counters(counters: StreamCounters) -> None:
    """Reset every counter but ``in_flight`` (the present, not history)."""
    for spec in dataclasses.fields(counters):
        if spec.name in ("in_flight", "users"):
            continue
        value = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        setattr(counters, spec.name, value)
    counters.peak_in_flight = counters.in_flight


# --- answers and tickets -------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    """An immediate answer: an HTTP error or unary body, or (``stream``) a lone end-of-stream frame."""

    status: int
    body: bytes
    headers: wire.Headers = wire.JSON_HEADERS
    stream: bool = False


@dataclass(slots=True)
class Ticket:
    """An admitted turn: counted in flight; its chat and both messages are recorded."""

    user: str
    chat: Chat
    new_chat: bool
    question: Message
    reply: Message
    think: list[str]
    text: list[str]
    outcome: Outcome | None
    limited: bool
    """The usage limit answered through the message status: canned text, failed status."""
    name: str
    """The chat's automatic name, sent after the first turn."""


@dataclass(slots=True)
class Ask:
    scenario: str
    prompt: str
    thinking: bool
    chat_id: str
    parent_id: str


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def get_field(body: Mapping[str, Any], name: str) -> Any:
    """A request field by its proto name or its JSON (camelCase) name, as protojson accepts both."""
    return body[name] if name in body else body.get(camel(name))


def parse_chat(body: Any) -> tuple[str, Ask | None]:
    """(problem, None) or ("", the request's parts)."""
    if not isinstance(body, dict):
        return "the request must be a JSON object", None
    scenario = body.get("scenario")
    if scenario not in wire.SCENARIOS:
        return f"unknown scenario {scenario!r}; expected one of {', '.join(wire.SCENARIOS)}", None
    message = body.get("message")
    if not isinstance(message, dict):
        return "message is required", None
    blocks = message.get("blocks")
    first = blocks[0] if isinstance(blocks, list) and blocks else None
    text = first.get("text") if isinstance(first, dict) else None
    prompt = text.get("content") if isinstance(text, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        return "message.blocks[0].text.content must be a non-empty string", None
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        return "options must be an object", None
    thinking = (options or {}).get("thinking")
    if thinking is not None and not isinstance(thinking, bool):
        return "options.thinking must be a boolean", None
    chat_id = get_field(body, "chat_id")
    parent_id = get_field(message, "parent_id")
    for name, value in (("chat_id", chat_id), ("message.parent_id", parent_id)):
        if value is not None and not isinstance(value, str):
            return f"{name} must be a string", None
    if parent_id and not chat_id:
        return "message.parent_id needs the chat_id of its chat", None
    return "", Ask(scenario, prompt, bool(thinking), chat_id or "", parent_id or "")


def page_of(body: Mapping[str, Any], default: int) -> tuple[int, int]:
    """(offset, size) from ``page_token`` and ``page_size``; ``ValueError`` when they are malformed."""
    size = get_field(body, "page_size")
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    if size is None or size == 0:
        size = default
    if not is_count(size):
        raise ValueError("page_size must be a non-negative integer")
    token = get_field(body, "page_token") or ""
    if not isinstance(token, str) or (token and not token.isdigit()):
        raise ValueError("page_token is not one this server gave")
    return int(token or 0), min(size, 1000)


def error_answer(code: str, message: str, status: int | None = None) -> Answer:
    return Answer(status or wire.CODE_STATUS[code], wire.error_body(code, message))
