"""ASGI plumbing the emulators share: noticing a client that went away, and cutting a connection.

ASGI has no message for "abort this connection", yet a faithful fake must be able to end a stream
the way a failing upstream does: bytes stop and the socket closes, with no end marker. uvicorn's
per-request ``send`` is a bound method of an object holding the connection's ``transport``;
``EmulatorApp`` keeps it in the scope on the way in, and ``cut_connection`` closes it (pending
bytes are flushed first, so the client receives what was sent, then EOF). Under another server,
``cut_connection`` raises ``ConnectionCut`` instead: ASGI servers close the connection of an
application that fails after starting its response, at the price of an error in their log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

_TRANSPORT = "kimi_pool.emulator.transport"


class ConnectionCut(Exception):
    """Raised to make the ASGI server close a connection mid-response."""


class EmulatorApp(Starlette):
    """A Starlette app whose handlers may cut their connection (``cut_connection``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_TRANSPORT] = getattr(getattr(send, "__self__", None), "transport", None)
        await super().__call__(scope, receive, send)


async def cut_connection(scope: Scope, receive: Receive) -> None:
    """Close the client connection now, without ending the HTTP response."""
    transport: Any = scope.get(_TRANSPORT)
    if transport is None or not hasattr(transport, "close"):
        raise ConnectionCut("connection cut by the emulator")
    transport.close()
    # Wait until the server has seen the connection go, so it does not report an unfinished reply.
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[None]) -> bool:
    """Run ``work`` in this task; True if it finished, False if the client went away first.

    A watcher task waits for ``http.disconnect`` and cancels this task when it comes, so a
    stream sleeping on the clock or held at a gate notices at once. ``work`` must end with its
    final ``send``: a server also reports ``http.disconnect`` once the response is complete.
    """
    task = asyncio.current_task()
    assert task is not None
    state = {"finished": False, "gone": False}

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not state["finished"]:
            state["gone"] = True
            task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        await work
        state["finished"] = True
        return True
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
        return False
    finally:
        state["finished"] = True
        watcher.cancel()


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class Endpoint:
    """Wraps an ASGI handler function so Starlette's ``Route`` serves it as raw ASGI.

    (``Route`` wraps plain functions as request → response endpoints; other callables are apps.)
    """

    __slots__ = ("handler",)

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


async def send_whole(send: Send, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
