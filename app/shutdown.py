"""Whether the server's shutdown grace period is over: the one fact a request needs at the end.

After SIGTERM the server lets requests in flight finish for ``--shutdown-grace`` seconds; then it
sets ``over`` and cancels what is still running (``app.serve.Server``). A request cancelled while
``over`` is set was cut by the shutdown, not left by its client: it answers with a 503
``shutting_down`` error (a JSON body, or a last ``data: {"error": …}`` event on a stream that has
begun) and is recorded with that outcome. Any other cancellation means what it always did.
"""

from __future__ import annotations

import asyncio

from app.errors import ShuttingDown


class Shutdown:
    __slots__ = ("over",)

    def __init__(self) -> None:
        self.over = False

    def end_grace(self) -> None:
        self.over = True

    def cut(self) -> ShuttingDown | None:
        """Called where a request caught ``CancelledError``: if the grace period is over, the error to
        answer with (the cancellation is then taken back, so that the answer can be sent); else None,
        and the caller re-raises."""
        if not self.over:
            return None
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return ShuttingDown()
