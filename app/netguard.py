"""Limits at the socket, so that no client can exhaust a server (uvicorn with httptools).

httptools keeps a request's head in memory however long it grows, and uvicorn closes no connection
that has not sent a whole request head. ``http_protocol(limits)`` is uvicorn's httptools protocol
(``uvicorn.Config(http=...)``) with three limits on top:

* a request head (request line and headers) over ``max_header_bytes`` is refused with 431;
* a connection whose request head has not fully arrived ``header_timeout`` seconds after it opened,
  or after its previous response ended, is closed: with a 408 if part of a head came, quietly if it
  never sent a byte (an idle connection between requests is left to uvicorn's keep-alive timeout);
* beyond ``max_connections`` open connections, a new one is answered 503 the moment it opens.

Refusals are OpenAI error objects, sent with ``connection: close``; the server then stops sending
(FIN), drops what else the client sends for up to ``LINGER`` seconds so the answer is not lost to a
reset, and closes. Bytes are counted only while a head is awaited, and a timer runs only for a
connection's first head and for a head that arrives in pieces: a body costs one check a read.

``raise_open_files_limit`` lifts the process's soft ``RLIMIT_NOFILE`` to its hard limit, and
``connection_cap`` keeps ``max_connections`` within what that limit can hold.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from app.errors import HeadersTooLarge, HeadTimeout, InvalidRequest, KimiPoolError, TooManyConnections

log = logging.getLogger("kimi_pool.net")

LINGER = 2.0
"""Seconds a refused connection keeps reading (and dropping) what its client still sends."""
FD_RESERVE = 128
"""Open files kept for everything but client connections: the database, logs, the workers' sockets."""


@dataclass(frozen=True, slots=True)
class NetLimits:
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    max_connections: int | None = None
    """None: no cap (the keeper's private socket, where only its own workers connect)."""


def http_protocol(limits: NetLimits) -> type[HttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: ``GuardedProtocol`` with ``limits``."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


class GuardedProtocol(HttpToolsProtocol):
    limits: ClassVar[NetLimits] = NetLimits()

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._awaiting_head = True
        """From the connection's start, and from the end of each request to its next head: bytes count."""
        self._head_bytes = 0
        self._since = 0.0
        """When the head now awaited could begin: the connection's start or the previous response's end."""
        self._refused = False
        self._timer: TimerHandle | None = None

    # --- the connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self.limits.max_connections
        if cap is not None and len(self.connections) > cap:
            self._refuse(TooManyConnections(f"The server has {cap} connections open, its limit; retry shortly."))
            return
        self._since = self.loop.time()
        self._timer = self.loop.call_at(self._since + self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._awaiting_head:  # a body, or bytes pipelined behind a request being served
            HttpToolsProtocol.data_received(self, data)
            return
        if self._refused:
            return
        self._head_bytes += len(data)
        HttpToolsProtocol.data_received(self, data)
        if self._awaiting_head and self._head_bytes and not self._refused and not self.transport.is_closing():
            if self._head_bytes > self.limits.max_header_bytes:
                self._head_too_large()
            elif self._timer is None and self._between_requests():
                self._start_timer()  # part of a head came after a response; a whole one needs no timer

    # --- parser callbacks: where a head ends, and where the next one begins ----------------------

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        if self._timer is not None:
            self._cancel_timer()
        if self._head_bytes > self.limits.max_header_bytes and self._head_size() > self.limits.max_header_bytes:
            # the whole head came in the read that crossed the limit: answer through the app's usual path
            # (the body is read and dropped meanwhile), then close
            self.app = _Refusal(self._too_large())
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._awaiting_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        HttpToolsProtocol.on_response_complete(self)
        # an idle connection is left to uvicorn's keep-alive timeout; a head begun is timed from here
        self._since = self.loop.time()
        if self._awaiting_head and self._head_bytes and self._timer is None and self._between_requests():
            self._start_timer()

    def _between_requests(self) -> bool:
        """No response is being sent (a head pipelined behind one is timed once it is sent)."""
        return self.cycle is None or self.cycle.response_complete

    def _start_timer(self) -> None:
        self._timer = self.loop.call_at(self._since + self.limits.header_timeout, self._head_timed_out)

    # --- refusals ------------------------------------------------------------------------------

    def _head_size(self) -> int:
        """About the size of the head just parsed (the request line's method and version guessed)."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) + 16

    def _too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(f"The request line and headers exceed {self.limits.max_header_bytes} bytes.")

    def _head_too_large(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            # the oversized head is pipelined behind a response still being sent: read no more, and
            # close once that response is complete
            self.flow.pause_reading()
            self.cycle.keep_alive = False
            return
        self._refuse(self._too_large())

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0:
            self.transport.close()  # nothing came: an idle connection ends quietly
            return
        self._refuse(HeadTimeout(f"The request line and headers did not arrive within "
                                 f"{self.limits.header_timeout:g} seconds."))

    def send_400_response(self, msg: str) -> None:
        """What httptools cannot parse: uvicorn's 400, as an OpenAI error object."""
        self._refuse(InvalidRequest("The request is not valid HTTP/1.1.", code="invalid_http_request"))

    def _refuse(self, error: KimiPoolError) -> None:
        """Answer ``error`` and end the connection: FIN at once, the socket closed after ``LINGER`` (at
        once if a request is being served: its response must not follow this one)."""
        self._cancel_timer()
        self._refused = True
        self._awaiting_head = True  # what else arrives goes to ``data_received``'s drop
        transport = self.transport
        transport.write(_response(error, self.server_state.default_headers))
        serving = self.cycle is not None and not self.cycle.response_complete
        if transport.can_write_eof() and not serving:
            transport.write_eof()
            self._timer = self.loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Refusal:
    """The app a connection gets once its head is refused: the error, then the connection closes."""

    def __init__(self, error: KimiPoolError) -> None:
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = orjson.dumps(self.error.body())
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": self.error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _response(error: KimiPoolError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = orjson.dumps(error.body())
    lines = [STATUS_LINE[error.status]]
    for name, value in [*default_headers, *((k.lower().encode(), v.encode()) for k, v in error.headers().items())]:
        lines += [name, b": ", value, b"\r\n"]
    lines += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
              b"\r\nconnection: close\r\n\r\n", body]
    return b"".join(lines)


# --- open files --------------------------------------------------------------------------------


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one (each connection is one); return the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel will not take
            log.debug("open files limit stays %d (hard %d): %s", soft, hard, exc)
            return soft
    log.debug("open files limit %d (was %d)", hard, soft)
    return hard


def connection_cap(wanted: int, open_files: int) -> int:
    """``wanted``, or fewer if the open-files limit cannot hold that many: each client connection may
    bring one upstream connection, and the process needs some files of its own."""
    if open_files == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (open_files - FD_RESERVE) // 2))
