"""The outermost ASGI app: the chat hot path goes straight to its handler; everything else
(other routes, preflight, lifespan) goes through the Starlette application and its middleware.
While the gateway is open (no key at all), every request must first pass ``app.api.loopback``."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from app.api.auth import Authenticator
from app.api.ids import Ids
from app.api.loopback import turned_away

CHAT_PATH = "/v1/chat/completions"


class FrontDoor:
    def __init__(self, app: Starlette, auth: Authenticator, ids: Ids) -> None:
        self.app = app
        self._auth = auth
        self._ids = ids

    @property
    def state(self) -> State:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self._auth.open and (refused := turned_away(scope, self._ids)) is not None:
                await refused(scope, receive, send)
                return
            if scope["path"] == CHAT_PATH and scope["method"] == "POST":
                await self.app.state.chat(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ChatRoute:
    """The same handler as a Starlette route endpoint (so the router knows the path and answers
    405 with ``Allow`` for other methods)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await scope["app"].state.chat(scope, receive, send)
