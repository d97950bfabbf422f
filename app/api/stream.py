"""Relaying a stream of server-sent events to the client, for every front-end: as the frames come, watching
for the client leaving (which cancels the upstream at once) and for the end of the shutdown's grace period
(which ends the stream with the protocol's error event)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from app.errors import KimiPoolError
from app.shutdown import Shutdown


def openai_error_frame(error: KimiPoolError) -> bytes:
    return b"data: " + orjson.dumps(error.body()) + b"\n\n"


class SSEResponse:
    """An ASGI response that relays an async iterator of frames as they come.

    It watches for the client going away while the upstream is quiet and, if so, cancels the
    relay at once (closing the upstream request and freeing the account). A relay cancelled because
    the shutdown's grace period is over ends with a ``shutting_down`` error event.
    """

    def __init__(self, frames: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]],
                 shutdown: Shutdown | None = None, error_frame: Callable[[KimiPoolError], bytes] = openai_error_frame,
                 ) -> None:
        """``error_frame``: the protocol's last event for an error (OpenAI's ``data: {"error": …}`` by default)."""
        self._frames = frames
        self._shutdown = shutdown
        self._error_frame = error_frame
        self._headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                         (b"x-accel-buffering", b"no"), *headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = _Relay()
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, task, state))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            async for frame in self._frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if state.client_gone:
                task.uncancel()  # our own cancellation: the client went away; the relay ends quietly
                return
            cut = self._shutdown.cut() if self._shutdown is not None else None
            if cut is None:
                raise
            await send({"type": "http.response.body", "body": self._error_frame(cut), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the connection broke under us; same as the client going away
        finally:
            state.finished = True
            watcher.cancel()
            with contextlib.suppress(Exception):
                await self._frames.aclose()  # type: ignore[attr-defined]

    @staticmethod
    async def _watch(receive: Receive, task: asyncio.Task[Any], state: _Relay) -> None:
        """Cancel the relay if the client disconnects while it is still running."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not state.finished:
            state.client_gone = True
            task.cancel()


class _Relay:
    __slots__ = ("client_gone", "finished")

    def __init__(self) -> None:
        self.client_gone = False
        self.finished = False
