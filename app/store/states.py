"""Account states, written through: a state change is in the database a few milliseconds after the
pool makes it, and the request that caused it waits for that (``saved``) before it fails over or
answers.

State changes are rare (a 429, a dead key, an empty balance, a cooldown ending) and they must
survive a crash: a server killed right after an account's 900 s cooldown began must not send
traffic straight back to it when it restarts. So they do not ride the write-behind queue
(``app.store.writer``: usage rows, sessions, flushed every second). ``changed`` notes the account
and wakes a task that writes every account changed since its last write in one transaction (a
group commit), with a health event per transition; ``saved`` returns once every change noted
before it is committed.

A write never overwrites a state someone else wrote: it is made only if the row's state revision is
still the one this server last read or wrote (``Account.stored``). When a probe (``kimi-pool accounts
check``) or an operator's enable wrote another one meanwhile, this server's write is dropped and
theirs stands; the server adopts it when it reloads the account, which their write asks for
(``config_rev``). Until a write is committed, ``unsaved`` tells the account sync to keep the
pool's newer state over the row's older one.

When the database fails, the changes stay queued and are tried again every ``retry`` seconds (on
the clock); the requests waiting in ``saved`` are let go, since a failed write must not hold up
traffic, and the failure is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from app.clock import Clock
from app.pool.account import Account, State
from app.pool.scheduler import Pool
from app.store.db import Database
from app.store.records import StateChange
from app.store.repository import AccountRepository, HealthRepository

log = logging.getLogger(__name__)


class StateWriter:
    def __init__(self, db: Database, pool: Pool, clock: Clock, *, retry: float = 1.0) -> None:
        self._db = db
        self._pool = pool
        self._clock = clock
        self._retry = retry
        self._queued: dict[str, _Queued] = {}  # account → its transitions not written yet
        self._writing: set[str] = set()
        self._told = 0
        self._settled = 0
        self._progress = asyncio.Condition()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.writes = 0
        """Transactions committed (for tests and status pages)."""
        self.conflicts = 0
        """Writes dropped because someone else had written the account's state first."""
        self.failures = 0
        """Transactions that failed (their changes stayed queued)."""

    # --- what the pool and the requests call -----------------------------------------------------

    def changed(self, account: Account) -> None:
        """The pool changed ``account``'s state (a listener of ``Pool.on_state_change``). An operator's
        ``disabled`` is the CLI's to store, not the server's."""
        if account.state is State.DISABLED:
            return
        queued = self._queued.get(account.name)
        if queued is None:
            queued = self._queued[account.name] = _Queued(account.stored)
        queued.changes.append(StateChange(
            ts=self._clock.time(), account=account.name, state=account.state.value, until=account.until,
            reason=account.reason))
        self._told += 1
        self._wake.set()

    async def saved(self) -> None:
        """Return once every change noted so far is committed (or its write failed and was logged)."""
        target = self._told
        if self._settled >= target:
            return
        async with self._progress:
            await self._progress.wait_for(lambda: self._settled >= target)

    async def wait_writes(self, count: int) -> None:
        """Return once ``writes`` reaches ``count`` (for tests and operators)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.writes >= count)

    def unsaved(self, name: str) -> bool:
        """Whether the pool holds a state of ``name`` that is not in the database yet."""
        return name in self._queued or name in self._writing

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kimi-pool state writer")

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queued:
            try:
                await self._write()
            except Exception as exc:
                log.error("account states of %s could not be stored at shutdown: %s", ", ".join(self._queued),
                          _describe(exc))
        await self._settle(self._told)  # nobody waits in ``saved`` for a writer that is gone

    # --- the task --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            if not self._queued:
                continue
            target = self._told
            try:
                await self._write()
            except Exception as exc:
                self.failures += 1
                log.warning("storing the state of account(s) %s failed, will retry: %s", ", ".join(self._queued),
                            _describe(exc))
                await self._settle(target)
                await self._pause()
                self._wake.set()
                continue
            await self._settle(target)

    async def _write(self) -> None:
        """One transaction: each queued account's current state, if the row holds what it expects, and
        the health events of the transitions that were stored."""
        batch, self._queued = self._queued, {}
        self._writing = set(batch)
        done: list[tuple[str, int | None]] = []
        conflicts: list[str] = []
        try:
            async with self._db.session() as session, session.begin():
                accounts = AccountRepository(session)
                events: list[StateChange] = []
                for name, queued in batch.items():
                    account = self._pool.accounts.get(name)
                    if account is None:  # removed meanwhile
                        continue
                    if account.state is not State.DISABLED:
                        # the revision the state was changed over: a reload that took someone else's
                        # state since has another, and so has the row
                        if not await accounts.replace_state(name, queued.expected, *account.runtime):
                            conflicts.append(name)
                            continue
                        done.append((name, queued.expected))
                    events += queued.changes
                await HealthRepository(session).add_many(events)
        except BaseException:
            for name, queued in batch.items():
                later = self._queued.get(name)
                if later is not None:
                    queued.changes += later.changes
                self._queued[name] = queued
            raise
        finally:
            self._writing = set()
        self.writes += 1
        for name, expected in done:
            written = None if expected is None else expected + 1
            account = self._pool.accounts.get(name)
            if account is not None and account.stored == expected:
                account.stored = written
            later = self._queued.get(name)  # changed again while this was written
            if later is not None and later.expected == expected:
                later.expected = written
        for name in conflicts:
            self.conflicts += 1
            log.info("account %s: its stored state was changed by someone else (a probe, an operator); that "
                     "state stands and this server adopts it when it reloads the account", name)

    async def _settle(self, target: int) -> None:
        self._settled = max(self._settled, target)
        async with self._progress:
            self._progress.notify_all()

    async def _pause(self) -> None:
        """Wait ``retry`` seconds on the clock, or less if the writer is closed."""
        sleeper = asyncio.ensure_future(self._clock.sleep(self._retry))
        closing = asyncio.ensure_future(self._closing())
        try:
            await asyncio.wait((sleeper, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            closing.cancel()

    async def _closing(self) -> None:
        while not self._closed:
            self._wake.clear()
            await self._wake.wait()


@dataclass(slots=True)
class _Queued:
    """An account's state changes not written yet, and the state revision they were made over."""

    expected: int | None
    changes: list[StateChange] = field(default_factory=list)


def _describe(exc: BaseException) -> str:
    """The error's type and first line (the engine hides bound parameters, so no secrets)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
