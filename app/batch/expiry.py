"""Files expire: the policy an upload or a batch gives (``expires_after``, ``output_expires_after``,
as OpenAI's Files and Batch APIs take it), and the sweeper that deletes expired files.

An expired file is gone at once for every read (``FileRepository`` filters by the clock) and no
longer counts against its key's caps; ``FileSweeper`` deletes its row (and content) soon after: it
sleeps until the next file expires, at most ``nap`` seconds, and is woken by ``expiring(at)`` when a
file that expires sooner is added.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from app.clock import Clock
from app.errors import InvalidRequest
from app.store.batches import FileRepository
from app.store.db import Database

log = logging.getLogger("kimi_pool.batch")

DEFAULT_EXPIRY = 30 * 86_400.0
"""A file uploaded without ``expires_after``, or a batch's output without ``output_expires_after``,
expires after this long: OpenAI's default for batch files."""
MIN_EXPIRY, MAX_EXPIRY = 3600, 30 * 86_400
NAP = 3600.0


def expiry_seconds(policy: Any, param: str) -> float | None:
    """The seconds of an expiry policy (None: none given); a 400 naming ``param`` unless it is
    ``{"anchor": "created_at", "seconds": N}`` with N from an hour to 30 days (a form field's digits do)."""
    if policy is None:
        return None
    seconds = policy.get("seconds") if isinstance(policy, dict) else None
    if isinstance(seconds, str) and seconds.isascii() and seconds.isdigit():
        seconds = int(seconds)
    if (not isinstance(policy, dict) or set(policy) - {"anchor", "seconds"} or policy.get("anchor") != "created_at"
            or not isinstance(seconds, int) or isinstance(seconds, bool) or not MIN_EXPIRY <= seconds <= MAX_EXPIRY):
        raise InvalidRequest(f"'{param}' must be {{\"anchor\": \"created_at\", \"seconds\": N}} with N from "
                             f"{MIN_EXPIRY} (an hour) to {MAX_EXPIRY} (30 days), not {policy!r}.", param=param)
    return float(seconds)


class FileSweeper:
    def __init__(self, db: Database, clock: Clock, *, nap: float = NAP) -> None:
        self._db = db
        self._clock = clock
        self._nap = nap
        self._next = float("inf")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.purged = 0
        """Files deleted so far (for tests and status pages)."""
        self._progress = asyncio.Condition()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kimi-pool file sweeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def expiring(self, at: float) -> None:
        """A file that expires at ``at`` was added: look again if that is sooner than planned."""
        if at < self._next:
            self._wake.set()

    async def wait_purged(self, count: int) -> None:
        """Return once ``purged`` reaches ``count``."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.purged >= count)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                async with self._db.session() as session, session.begin():
                    files = FileRepository(session)
                    deleted = await files.purge_expired(self._clock.time())
                    upcoming = await files.next_expiry()
            except Exception as exc:  # the database is away: try again after a nap
                log.warning("deleting expired files failed, will retry: %s", exc)
                deleted, upcoming = 0, None
            if deleted:
                log.info("deleted %d expired file(s)", deleted)
                self.purged += deleted
                async with self._progress:
                    self._progress.notify_all()
            self._next = min(upcoming if upcoming is not None else float("inf"), self._clock.time() + self._nap)
            await self._sleep_until(self._next)

    async def _sleep_until(self, at: float) -> None:
        sleeper = asyncio.ensure_future(self._clock.sleep_until(at))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            woken.cancel()
