"""What the kimi.com web emulator writes on the wire (PROTOCOLS.md 3.2, 3.4, 3.5).

* Connect envelopes: one flag byte, a 4-byte big-endian length, then UTF-8 JSON. Flag ``0x00`` is a
  data frame, ``0x02`` the end-of-stream frame (``{}`` on success, ``{"error": …}`` on failure).
* Connect error bodies for unary answers and HTTP-level refusals, with the code → status table.
* The data frames of one reply, in the "op + mask" model, and the deterministic reply text.
* Opaque ids in the xid layout Kimi's chat ids have (20 characters of base32hex, time first).
"""

from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import orjson

Headers = tuple[tuple[bytes, bytes], ...]
CONNECT_JSON = "application/connect+json"
STREAM_HEADERS: Headers = ((b"content-type", CONNECT_JSON.encode()),)
JSON_HEADERS: Headers = ((b"content-type", b"application/json"),)

DATA = 0x00
COMPRESSED = 0x01
END_STREAM = 0x02
_HEADER = struct.Struct(">BI")

CODE_STATUS = MappingProxyType({
    "invalid_argument": 400, "unauthenticated": 401, "permission_denied": 403, "not_found": 404,
    "aborted": 409, "already_exists": 409, "resource_exhausted": 429, "internal": 500, "unknown": 500,
    "unimplemented": 501, "unavailable": 503, "deadline_exceeded": 504,
})
"""Connect error code → HTTP status of a unary (or HTTP-level) error, as connect-go maps them."""

STATUS_COMPLETED = "MESSAGE_STATUS_COMPLETED"
STATUS_GENERATING = "MESSAGE_STATUS_GENERATING"
STATUS_FAILED = "MESSAGE_STATUS_FAILED"
"""The non-success status of an assistant message cut short, or refused by the usage limit."""

SCENARIOS = ("SCENARIO_K2", "SCENARIO_K2D5", "SCENARIO_K2D6", "SCENARIO_SEARCH", "SCENARIO_RESEARCH",
             "SCENARIO_K1", "SCENARIO_OK_COMPUTER")

# --- texts ---------------------------------------------------------------------------------------

USAGE_LIMIT_TEXT = "Usage limit reached. You have used up the conversations of this period; please try again later."
"""The assistant's canned answer when the quota speaks through the message status (``quota_mode`` status)."""
USAGE_LIMIT = "usage limit reached; please try again later"
BUSY = "another reply is still being generated for this user"
NO_TOKEN = "no access token"
BAD_TOKEN = "the access token is invalid"
EXPIRED_TOKEN = "the access token has expired"
REVOKED_TOKEN = "the access token has been revoked"
INTERNAL = "an internal error occurred"
UNAVAILABLE = "the service is temporarily unavailable"


def usage_limit(turns: int, window: float, wait: float) -> str:
    return (f"usage limit reached: {turns} conversation turns per {window:g} seconds; "
            f"try again in {max(1, round(wait))} seconds")


# --- envelopes -----------------------------------------------------------------------------------


class FramingError(ValueError):
    """A request body that is not exactly one JSON data envelope."""


def envelope(flags: int, payload: bytes) -> bytes:
    return _HEADER.pack(flags, len(payload)) + payload


def data_frame(message: object) -> bytes:
    return envelope(DATA, orjson.dumps(message))


END_OK = envelope(END_STREAM, b"{}")
HEARTBEAT = data_frame({"heartbeat": {}})
DONE = data_frame({"done": {}})


def end_frame(code: str, message: str) -> bytes:
    """The end-of-stream frame of a failed stream."""
    return envelope(END_STREAM, orjson.dumps({"error": {"code": code, "message": message}}))


def error_body(code: str, message: str) -> bytes:
    """A Connect unary error body."""
    return orjson.dumps({"code": code, "message": message})


def decode_request(raw: bytes) -> Any:
    """The JSON of a streaming request's single envelope; ``FramingError`` says what is wrong."""
    if len(raw) < _HEADER.size:
        raise FramingError("the request is not an enveloped message (it is shorter than an envelope header)")
    flags, length = _HEADER.unpack_from(raw)
    if flags == COMPRESSED:
        raise FramingError("compressed request messages are not supported")
    if flags != DATA:
        raise FramingError(f"the request is not an enveloped message (it starts with 0x{flags:02x})")
    if len(raw) != _HEADER.size + length:
        raise FramingError(f"the envelope declares {length} bytes but carries {len(raw) - _HEADER.size}")
    try:
        return orjson.loads(raw[_HEADER.size:])
    except orjson.JSONDecodeError as exc:
        raise FramingError(f"the message is not valid JSON: {exc}") from None


# --- times and ids -------------------------------------------------------------------------------


def iso(when: float) -> str:
    """RFC 3339 in UTC as protojson writes a Timestamp: 0, 3, 6 or 9 fractional digits."""
    seconds = int(when // 1)
    micros = round((when - seconds) * 1_000_000)
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, 0
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if micros == 0:
        return stamp + "Z"
    if micros % 1000 == 0:
        return f"{stamp}.{micros // 1000:03d}Z"
    return f"{stamp}.{micros:06d}Z"


def xid(when: float, machine: bytes, counter: int) -> str:
    """A 20-character id: 4 bytes of seconds, 5 of machine, 3 of counter, in lowercase base32hex."""
    raw = struct.pack(">I", int(when) & 0xFFFFFFFF) + machine[:5] + (counter & 0xFFFFFF).to_bytes(3, "big")
    return base64.b32hexencode(raw).decode("ascii")[:20].lower()


# --- the reply -----------------------------------------------------------------------------------

_ANSWER = ("Hello", "from", "the", "Kimi", "web", "emulator,", "a", "deterministic", "reply", "for", "the",
           "gateway.")
_THOUGHT = ("Let", "me", "think", "about", "this", "request", "before", "answering.")


def reply_pieces(turn: int, words: int) -> list[str]:
    """``["Turn N of chat:", " Hello", " from", …]``: the heading, then ``words`` words."""
    return [f"Turn {turn} of chat:", *(" " + _ANSWER[i % len(_ANSWER)] for i in range(words))]


def think_pieces(words: int) -> list[str]:
    """``["Let", " me", " think", …]``: ``words`` words of reasoning."""
    return [("" if i == 0 else " ") + _THOUGHT[i % len(_THOUGHT)] for i in range(words)]


def title(prompt: str) -> str:
    """The chat's automatic name: the prompt's first five words, at most 40 characters."""
    return " ".join(prompt.split()[:5])[:40]


# --- data frames ---------------------------------------------------------------------------------


def chat_frame(chat_id: str, name: str, created: str) -> bytes:
    return data_frame({"op": "set", "mask": "chat", "chat": {"id": chat_id, "name": name, "createTime": created}})


def message_frame(message_id: str, parent_id: str, role: str, status: str, scenario: str, created: str) -> bytes:
    return data_frame({"op": "set", "mask": "message", "message": {
        "id": message_id, "parentId": parent_id, "role": role, "status": status, "scenario": scenario,
        "createTime": created}})


def block_frames(kind: str, block_id: str, parent_id: str, pieces: list[str]) -> list[bytes]:
    """``kind`` (``think`` or ``text``): one ``set`` of the first piece, then an ``append`` per further piece."""
    if not pieces:
        return []
    first = data_frame({"op": "set", "mask": f"block.{kind}",
                        "block": {"id": block_id, "parentId": parent_id, kind: {"content": pieces[0]}}})
    mask = f"block.{kind}.content"
    return [first, *(data_frame({"op": "append", "mask": mask, "block": {"id": block_id, kind: {"content": piece}}})
                     for piece in pieces[1:])]


def status_frame(message_id: str, status: str) -> bytes:
    return data_frame({"op": "set", "mask": "message.status", "message": {"id": message_id, "status": status}})


def chat_name_frame(chat_id: str, name: str) -> bytes:
    return data_frame({"op": "set", "mask": "chat.name", "chat": {"id": chat_id, "name": name}})
