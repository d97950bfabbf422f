"""Group commit: a batch request's result is stored before anything counts it done.

``save(result)`` returns only once the transaction holding the result has committed, and raises if
it failed; it is the opposite of the write-behind queue, which never makes the request path wait.
Results that arrive while a transaction is being written go together in the next one, so a pool
finishing thousands of requests a second costs a few commits a second, not thousands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app.clock import Clock
from app.store.batches import BatchRepository, ItemResult
from app.store.db import Database

log = logging.getLogger("kimi_pool.batch")


class GroupCommit:
    def __init__(self, db: Database, clock: Clock, *, max_group: int = 1000) -> None:
        self._db = db
        self._clock = clock
        self._max_group = max_group
        self._queue: list[tuple[ItemResult, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.commits = 0
        """Transactions written (for tests and status pages)."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kimi-pool batch commits")

    async def save(self, result: ItemResult) -> None:
        """Store ``result``; return once it is committed. A caller cancelled while waiting does not
        take the result back: it is written all the same."""
        if self._closed:
            raise RuntimeError("the batch result store is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((result, future))
        self._wake.set()
        await future

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                group, self._queue = self._queue[:self._max_group], self._queue[self._max_group:]
                await self._write(group)
            if self._closed:
                return

    async def _write(self, group: list[tuple[ItemResult, asyncio.Future[None]]]) -> None:
        try:
            async with self._db.session() as session, session.begin():
                await BatchRepository(session).save_results([result for result, _ in group], self._clock.time())
        except Exception as exc:
            log.error("storing %d batch result(s) failed: %s", len(group), exc)
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        self.commits += 1
        for _, future in group:
            if not future.done():
                future.set_result(None)
