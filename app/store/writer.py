"""Write-behind: the request path hands records over without ever awaiting the database.

``put_usage``, ``put_limits``, ``put_session`` and ``put_idempotent`` are plain synchronous appends to
in-memory buffers. A background task flushes them in one transaction every ``interval`` seconds (on
the injected clock), or at once when ``max_batch`` usage records are waiting. A failed flush keeps
the records and tries again on the next tick; the buffers are bounded (``max_buffer``) and drop
their oldest entries, with a warning, when the database stays away too long. ``close()`` stops the
task and flushes what is left.

Progress is observable: ``flushes`` counts flushes that wrote something, ``failures`` counts flushes
that raised (whether the background task, ``close()`` or a caller ran them), and ``wait_flushes`` /
``wait_failures`` return once a count is reached, so tests and operators wait on events, not time.

What a ``kill -9`` can lose is what waits here: the usage rows and session bindings of (at most)
the last ``interval`` seconds, or of the last ``max_batch`` requests when they come faster. Account
states do not wait here: they are written through (``app.store.states``).

Idempotent answers are read back before they are written: ``idempotent(key)`` finds one that is
queued or being written, so between ``put_idempotent`` and the commit that stores it, an answer is
always either here or in the database. A flush that writes answers also deletes the expired ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from typing import TypeVar

from app.clock import Clock
from app.pool.limits import Learned
from app.pool.sessions import Binding
from app.store.db import Database
from app.store.records import IdempotentAnswer, UsageRecord
from app.store.repository import AccountRepository, IdempotencyRepository
from app.store.sessions import SessionRepository
from app.store.usage import UsageRepository

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class WriteBehind:
    def __init__(self, db: Database, *, clock: Clock, interval: float = 1.0, max_batch: int = 500,
                 max_buffer: int = 100_000) -> None:
        if interval <= 0 or max_batch <= 0 or max_buffer < max_batch:
            raise ValueError("need interval > 0 and 0 < max_batch <= max_buffer")
        self._db = db
        self._clock = clock
        self._interval = interval
        self._max_batch = max_batch
        self._max_buffer = max_buffer
        self._usage: deque[UsageRecord] = deque()
        self._limits: dict[str, tuple[int, Learned]] = {}
        self._sessions: dict[str, Binding] = {}
        self._answers: dict[str, IdempotentAnswer] = {}
        self._writing_answers: dict[str, IdempotentAnswer] = {}  # taken by the flush in progress
        self._dropped = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._flushes = 0
        self._failures = 0
        self._progress = asyncio.Condition()  # notified after every flush that wrote or failed

    # --- the request path: synchronous, never touches the database -----------------------------

    def put_usage(self, record: UsageRecord) -> None:
        self._usage.append(record)
        self._dropped += _trim(self._usage, self._max_buffer)
        if len(self._usage) >= self._max_batch:
            self._wake.set()

    def put_limits(self, account: str, limits_rev: int, learned: Learned) -> None:
        """Persist what the pool has learned of an account's limits (the latest wins). It is written only
        while the stored ``limits_rev`` is still ``limits_rev``: an operator's ``reset-limits`` in between wins."""
        self._limits[account] = (limits_rev, learned)

    def put_session(self, binding: Binding) -> None:
        """Persist a conversation binding as it is now (a copy; the latest per key wins)."""
        self._sessions[binding.key] = dataclasses.replace(binding)

    def put_idempotent(self, answer: IdempotentAnswer) -> None:
        """Store the answer to a request with an ``Idempotency-Key`` (the latest per key wins)."""
        self._answers[answer.key] = answer

    def idempotent(self, key: str) -> IdempotentAnswer | None:
        """The answer put for ``key`` that is not in the database yet (queued, or in the flush under way)."""
        return self._answers.get(key) or self._writing_answers.get(key)

    @property
    def pending(self) -> int:
        """How many records wait to be written."""
        return len(self._usage) + len(self._limits) + len(self._sessions) + len(self._answers)

    # --- progress: for tests and operators --------------------------------------------------------

    @property
    def flushes(self) -> int:
        """How many flushes have written something (a flush with nothing queued does not count)."""
        return self._flushes

    @property
    def failures(self) -> int:
        """How many flushes have failed (their records stayed queued)."""
        return self._failures

    async def wait_flushes(self, count: int) -> None:
        """Return once ``flushes`` reaches ``count`` (at once if it already has)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self._flushes >= count)

    async def wait_failures(self, count: int) -> None:
        """Return once ``failures`` reaches ``count`` (at once if it already has)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self._failures >= count)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("WriteBehind already started")
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kimi-pool write-behind")

    async def close(self) -> None:
        """Stop the background task (after the flush it may be in) and write whatever is still queued."""
        self._closed = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait((task,))  # let it finish the flush it may be in; never raises
            error = None if task.cancelled() else task.exception()
            if error is not None:
                logger.error("write-behind: the flush task failed: %s", _describe(error))
        try:
            await self.flush()
        except Exception as exc:
            logger.error("write-behind: final flush failed, %d records lost: %s",
                         self.pending, _describe(exc))

    async def flush(self) -> None:
        """Write everything queued in one transaction. On failure the records stay queued and it raises.

        Counts towards ``flushes`` if it wrote something, towards ``failures`` if it raised.
        """
        try:
            wrote = await self._write()
        except BaseException:
            await self._progressed(failed=True)
            raise
        if wrote:
            await self._progressed(failed=False)

    # --- internals ------------------------------------------------------------------------------

    async def _write(self) -> bool:
        """The flush itself, uncounted. Returns whether there was anything to write."""
        async with self._lock:
            if self._dropped:
                logger.warning("write-behind: buffer full, dropped the %d oldest records", self._dropped)
                self._dropped = 0
            if not self.pending:
                return False
            usage, limits, sessions, answers = list(self._usage), self._limits, self._sessions, self._answers
            self._usage.clear()
            self._limits = {}
            self._sessions = {}
            self._answers = {}
            self._writing_answers = answers
            try:
                async with self._db.session() as session, session.begin():
                    await UsageRepository(session).add_many(usage)
                    accounts = AccountRepository(session)
                    for account, (limits_rev, learned) in limits.items():
                        await accounts.save_learned_limits(account, learned, limits_rev)
                    await SessionRepository(session).upsert_many(list(sessions.values()))
                    if answers:
                        idempotency = IdempotencyRepository(session)
                        await idempotency.put_many(list(answers.values()))
                        await idempotency.purge(self._clock.time())
            except BaseException:
                self._requeue(usage, sessions, answers)
                for account, entry in limits.items():
                    self._limits.setdefault(account, entry)
                raise
            finally:
                self._writing_answers = {}
            return True

    async def _progressed(self, *, failed: bool) -> None:
        """Count a flush that wrote (or failed) and wake ``wait_flushes``/``wait_failures``.

        Waiters hold the condition's lock only while checking their predicate, never across an
        await, so acquiring it here does not suspend (nor can a cancellation interrupt it).
        """
        if failed:
            self._failures += 1
        else:
            self._flushes += 1
        async with self._progress:
            self._progress.notify_all()

    def _requeue(self, usage: list[UsageRecord], sessions: dict[str, Binding],
                 answers: dict[str, IdempotentAnswer]) -> None:
        self._usage.extendleft(reversed(usage))
        for key, binding in sessions.items():  # a newer binding put meanwhile wins
            self._sessions.setdefault(key, binding)
        for key, answer in answers.items():
            self._answers.setdefault(key, answer)
        self._dropped += _trim(self._usage, self._max_buffer)

    async def _run(self) -> None:
        failed = False
        while True:
            await self._wait_tick(early=not failed)
            if self._closed:
                return
            try:
                wrote = await self._write()
            except Exception as exc:
                failed = True
                logger.warning("write-behind: flush failed, will retry (%d records queued): %s",
                               self.pending, _describe(exc))
                await self._progressed(failed=True)  # after the warning: a waiter may look for it
                continue
            failed = False
            if wrote:
                await self._progressed(failed=False)

    async def _wait_tick(self, *, early: bool) -> None:
        """Wait ``interval`` on the clock; return early on close, or (if ``early``) when a batch is full.

        After a failed flush ``early`` is off, so a full buffer does not spin against a dead database.
        """
        sleeper = asyncio.ensure_future(self._clock.sleep(self._interval))
        try:
            while not sleeper.done() and not self._closed:
                if early and len(self._usage) >= self._max_batch:
                    return
                self._wake.clear()
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait((sleeper, woken), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
        finally:
            sleeper.cancel()


def _trim(buffer: deque[_T], limit: int) -> int:
    dropped = 0
    while len(buffer) > limit:
        buffer.popleft()
        dropped += 1
    return dropped


def _describe(exc: BaseException) -> str:
    """The error's type and first line (the engine hides bound parameters, so no secrets)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
