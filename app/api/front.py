"""The outermost ASGI app: the chat hot path goes straight to its handler; everything else
(other routes, preflight, lifespan) goes through the Starlette application and its middleware.
While the gateway is open (no key at all), every request must first pass ``app.api.loopback``."""

from __future__ import annotations

import asyncio
import logging

import orjson
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import Authenticator
from app.api.ids import Ids
from app.api.loopback import turned_away
from app.shutdown import Shutdown

CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
HOT_PATHS = {CHAT_PATH: "chat", MESSAGES_PATH: "anthropic"}
"""``POST`` paths served by a bare ASGI handler, before Starlette's routing and middleware → the name of the
handler on ``app.state`` (each protocol's front-end adds its own)."""
log = logging.getLogger("kimi_pool.api")


class FrontDoor:
    def __init__(self, app: Starlette, auth: Authenticator, ids: Ids, shutdown: Shutdown | None = None) -> None:
        self.app = app
        self._auth = auth
        self._ids = ids
        self.shutdown = shutdown or Shutdown()

    @property
    def state(self) -> State:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self._auth.open and (refused := turned_away(scope, self._ids)) is not None:
                await refused(scope, receive, send)
                return
            hot = HOT_PATHS.get(scope["path"]) if scope["method"] == "POST" else None
            if hot is not None:
                await getattr(self.app.state, hot)(scope, receive, send)
            else:
                await answer_cut(self.app, scope, receive, send, self.shutdown)
            return
        await self.app(scope, receive, send)


class HotRoute:
    """A hot-path handler as a Starlette route endpoint too (so the router knows the path and answers 405
    with ``Allow`` for other methods)."""

    def __init__(self, name: str) -> None:
        self._name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await getattr(scope["app"].state, self._name)(scope, receive, send)


async def answer_cut(app: ASGIApp, scope: Scope, receive: Receive, send: Send, shutdown: Shutdown) -> None:
    """Run ``app`` on one request. If the end of the shutdown's grace period cuts it before its response
    began, answer 503 ``shutting_down`` (instead of uvicorn's plain-text 500); after, the response is cut
    off (the connection closes), which is the truth."""
    started = False

    async def watched(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, watched)
    except asyncio.CancelledError:
        error = shutdown.cut()
        if error is None:
            raise
        log.warning("%s %s was still running at the end of the shutdown grace period", scope["method"],
                    scope["path"])
        if started:
            return
        body = orjson.dumps(error.body())
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
