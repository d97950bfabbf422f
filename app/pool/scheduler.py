"""The pool: which account takes the next request. Pure logic on an injected clock; no I/O.

Round robin walks a ring from a cursor and takes the first account that is active, serves the
model and has room. The ring holds each account as many times as its weight asks, interleaved
(smooth weighted round robin), so weights scale shares without any per-decision arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from app.clock import Clock
from app.errors import AuthDead, QuotaExhausted, RateLimited, UpstreamError
from app.pool.account import Account, State

StateListener = Callable[[Account], None]

MAX_COOLDOWN = 300.0
"""Repeated rate limits double the wait, up to this many seconds."""


class Lease:
    """An account taken for one request. ``release`` gives the slot back, once."""

    __slots__ = ("_pool", "account", "released")

    def __init__(self, pool: Pool, account: Account) -> None:
        self._pool = pool
        self.account = account
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._pool._release(self.account)


class Pool:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._accounts: dict[str, Account] = {}
        self._ring: list[Account] = []
        self._cursor = 0
        self._listeners: list[StateListener] = []
        self._release_listeners: list[Callable[[], None]] = []
        self._models: frozenset[str] | None = None

    # --- membership (driven by the store sync) -------------------------------------------------

    @property
    def accounts(self) -> dict[str, Account]:
        return self._accounts

    def put(self, account: Account) -> None:
        """Add an account or replace one of the same name, keeping its in-flight count."""
        old = self._accounts.get(account.name)
        if old is not None:
            account.in_flight = old.in_flight
            account.streak = old.streak
        self._accounts[account.name] = account
        self._rebuild()

    def remove(self, name: str) -> None:
        if self._accounts.pop(name, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        self._models = None
        accounts = list(self._accounts.values())
        if not accounts:
            self._ring = []
            return
        lowest = min(a.weight for a in accounts)
        reps = [max(1, round(a.weight / lowest * 10)) for a in accounts]
        divisor = math.gcd(*reps)
        reps = [r // divisor for r in reps]
        # smooth weighted round robin, computed once per membership change
        total = sum(reps)
        current = [0] * len(accounts)
        ring: list[Account] = []
        for _ in range(total):
            for i, r in enumerate(reps):
                current[i] += r
            best = max(range(len(accounts)), key=current.__getitem__)
            current[best] -= total
            ring.append(accounts[best])
        self._ring = ring
        self._cursor %= len(ring)

    def on_state_change(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def on_release(self, listener: Callable[[], None]) -> None:
        self._release_listeners.append(listener)

    # --- questions -----------------------------------------------------------------------------

    def models(self) -> frozenset[str]:
        """Models served by accounts that are not disabled (cached; asked on every request)."""
        if self._models is None:
            served: set[str] = set()
            for account in self._accounts.values():
                if account.state is not State.DISABLED:
                    served |= account.models
            self._models = frozenset(served)
        return self._models

    def serving(self, model: str) -> Iterable[Account]:
        return (a for a in self._accounts.values() if model in a.models and a.state is not State.DISABLED)

    def next_free_in(self, model: str) -> float | None:
        """Seconds until some account could take ``model``; None if none can without an operator."""
        now = self._clock.time()
        times = [t for a in self.serving(model) if (t := a.free_at(now)) is not None]
        if not times:
            return None
        return max(0.0, min(times) - now)

    # --- scheduling ----------------------------------------------------------------------------

    def acquire(self, model: str, exclude: frozenset[str] | set[str] = frozenset()) -> Lease | None:
        """Take the next account in ring order that can serve ``model`` now, or None."""
        ring = self._ring
        size = len(ring)
        if not size:
            return None
        now = self._clock.time()
        start = self._cursor
        for step in range(size):
            account = ring[(start + step) % size]
            if account.state is not State.ACTIVE and not self._refresh(account, now):
                continue
            if model not in account.models or account.name in exclude or not account.has_room():
                continue
            self._cursor = (start + step + 1) % size
            account.in_flight += 1
            return Lease(self, account)
        return None

    def _refresh(self, account: Account, now: float) -> bool:
        if account.refresh(now):
            self._changed(account)
        return account.state is State.ACTIVE

    def _current(self, account: Account) -> Account:
        """The live object for this account (a reload may have replaced the one a lease holds)."""
        return self._accounts.get(account.name, account)

    def _release(self, account: Account) -> None:
        current = self._current(account)
        if current is not account:
            account.in_flight -= 1
        current.in_flight -= 1
        for listener in self._release_listeners:
            listener()

    # --- outcomes ------------------------------------------------------------------------------

    def succeeded(self, account: Account) -> None:
        self._current(account).streak = 0

    def report(self, account: Account, error: UpstreamError) -> None:
        """Change the account's state as the classified upstream failure says."""
        account = self._current(account)
        if account.state in (State.DISABLED, State.AUTH_DEAD):
            return
        now = self._clock.time()
        if isinstance(error, AuthDead):
            account.kill(error.message)
        elif isinstance(error, QuotaExhausted):
            account.exhaust(error.until, error.message)
        elif isinstance(error, RateLimited):
            if account.state is State.QUOTA_EXHAUSTED:
                return
            wait = min(MAX_COOLDOWN, max(error.retry_after, 1.0) * (2 ** min(account.streak, 8)))
            account.streak += 1
            until = now + wait
            if account.state is State.COOLING_DOWN and account.until is not None and account.until > until:
                return
            account.cool_down(until, error.message)
        else:
            return  # overload, transient, bad request: not the account's fault
        self._changed(account)

    def set_operator_state(self, account: Account, enabled: bool, reason: str | None) -> None:
        if not enabled and account.state is not State.DISABLED:
            account.disable(reason)
        elif enabled and account.state is State.DISABLED:
            account.enable()
        else:
            return
        self._changed(account)

    def _changed(self, account: Account) -> None:
        self._models = None
        for listener in self._listeners:
            listener(account)
