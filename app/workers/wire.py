"""The keeper's lease channel: length-prefixed JSON frames over a Unix socket.

Each frame is a JSON array whose first element names the message. Writes are coalesced: what one
turn of the event loop sends leaves in a single ``write`` (a request's release, its usage record and
the next request's lease share one syscall under load).

Worker → keeper: ``hello``, ``take``, ``drop``, ``release``, ``report``, ``failed``,
``thread``, ``done``, ``free_in``, ``saved``, ``reloaded``. Keeper → worker: ``lease``, ``refused``,
``free_in``, ``saved``, ``reload``.
The handlers on both sides (``app.workers.keeper``, ``app.workers.client``) document each one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import orjson

from app import errors
from app.errors import UpstreamError

log = logging.getLogger("kimi_pool.workers")

_HEADER = 4
MAX_FRAME = 16 * 1024 * 1024

Frame = list[Any]


class FrameProtocol(asyncio.Protocol):
    """Reads frames into ``on_frame``; ``send`` queues one for the end of this loop turn."""

    def __init__(self, on_frame: Callable[[Frame], None], on_lost: Callable[[], None]) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        end = len(buffer)
        while end - start >= _HEADER:
            size = int.from_bytes(buffer[start:start + _HEADER], "big")
            if size > MAX_FRAME:
                log.error("lease channel: a frame of %d bytes; closing the connection", size)
                self.close()
                return
            if end - start - _HEADER < size:
                break
            frame = orjson.loads(buffer[start + _HEADER:start + _HEADER + size])
            start += _HEADER + size
            try:
                self._on_frame(frame)
            except Exception:
                log.exception("lease channel: handling %r failed", frame[0] if frame else frame)
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost()

    def send(self, frame: Frame) -> None:
        if self.closed:
            return
        body = orjson.dumps(frame)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(len(body).to_bytes(_HEADER, "big") + body)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self.closed and out:
            self._transport.write(b"".join(out))

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._flush()
            self._transport.close()


_ERRORS: dict[str, type[UpstreamError]] = {
    cls.__name__: cls for cls in (errors.AuthDead, errors.RateLimited, errors.QuotaExhausted,
                                  errors.UpstreamOverloaded, errors.UpstreamBadRequest, errors.Unsuitable,
                                  errors.Transient, errors.UpstreamError)
}


def encode_error(error: UpstreamError) -> dict[str, Any]:
    """A classified upstream failure as plain data (what the pool and the metrics read of it)."""
    data: dict[str, Any] = {"class": type(error).__name__, "message": error.message, "status": error.status,
                            "type": error.type, "code": error.code, "param": error.param}
    for name in ("retry_after", "bucket", "limit", "until"):
        if hasattr(error, name):
            data[name] = getattr(error, name)
    return data


def decode_error(data: dict[str, Any]) -> UpstreamError:
    cls = _ERRORS.get(data.get("class", ""), errors.Transient)
    message = str(data.get("message", ""))
    error: UpstreamError
    if cls is errors.RateLimited:
        error = errors.RateLimited(message, retry_after=float(data.get("retry_after") or 0.0),
                                   bucket=data.get("bucket"), limit=data.get("limit"))
    elif cls is errors.QuotaExhausted:
        error = errors.QuotaExhausted(message, until=data.get("until"))
    elif cls is errors.UpstreamOverloaded:
        error = errors.UpstreamOverloaded(message, retry_after=float(data.get("retry_after") or 1.0))
    elif cls is errors.UpstreamBadRequest:
        error = errors.UpstreamBadRequest(message, status=int(data.get("status") or 400),
                                          type=str(data.get("type") or "invalid_request_error"),
                                          code=data.get("code"), param=data.get("param"))
    else:
        error = cls(message, param=data.get("param"))
    return error
