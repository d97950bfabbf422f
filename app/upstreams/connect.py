"""Connect streaming envelopes (connectrpc.com/docs/protocol; PROTOCOLS.md §3.2).

Each message is one byte of flags, a four-byte big-endian length and that many bytes of JSON.
Flag ``0x02`` marks the end-of-stream message, whose JSON carries the trailers and, on failure,
``{"error": {"code", "message"}}``; ``0x01`` marks compression, which kimi-pool never asks for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

END_STREAM = 0x02
COMPRESSED = 0x01
_HEADER = struct.Struct(">BI")
MAX_MESSAGE = 16 * 1024 * 1024
"""A length beyond this is a framing error, not a message to wait for."""


class FramingError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Envelope:
    flags: int
    data: bytes

    @property
    def end_of_stream(self) -> bool:
        return bool(self.flags & END_STREAM)


def envelope(data: bytes, flags: int = 0) -> bytes:
    return _HEADER.pack(flags, len(data)) + data


class EnvelopeReader:
    """Cuts a byte stream into envelopes, whatever the TCP reads split or join."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Envelope]:
        self._buffer += data
        out = []
        buffer = self._buffer
        while len(buffer) >= 5:
            flags, length = _HEADER.unpack_from(buffer)
            if length > MAX_MESSAGE or flags & ~(END_STREAM | COMPRESSED):
                raise FramingError(f"bad Connect envelope (flags {flags:#x}, length {length})")
            if flags & COMPRESSED:
                raise FramingError("compressed Connect envelope, though no compression was offered")
            if len(buffer) < 5 + length:
                break
            out.append(Envelope(flags, bytes(buffer[5:5 + length])))
            del buffer[:5 + length]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an unfinished envelope held back."""
        return len(self._buffer)
