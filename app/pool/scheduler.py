"""The pool: which account takes the next request. Pure logic on an injected clock; no I/O.

Round robin walks a ring from a cursor and takes the first account that is active, serves the
model, has a free concurrency slot and room in its windows for the request's cost. The ring holds
each account as many times as its weight asks, interleaved (stride order: the k-th copy of an
account with r copies sits at (k + ½) / r), so weights scale shares without any per-decision
arithmetic. The ring is rebuilt lazily, once after a batch of membership changes. A request may *prefer* an account (its
conversation's): it then waits for that account while it could serve before the request's
deadline, and moves to another one when it could not.

A *batch* request (``batch=True``) is held to ``1 - interactive_share`` of each account's
concurrency and windows, so the share stays free for interactive requests, which may use it all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from app.clock import Clock
from app.errors import AuthDead, QuotaExhausted, RateLimited, UpstreamError
from app.pool.account import Account, State
from app.pool.limits import Charge

StateListener = Callable[[Account], None]

MAX_COOLDOWN = 300.0
"""Repeated rate limits double the wait, up to this many seconds (a longer wait the upstream names is kept)."""


class Lease:
    """An account taken for one request. ``release`` gives the slot back (once) and trues up the cost."""

    __slots__ = ("_pool", "account", "charge", "released")

    def __init__(self, pool: Pool, account: Account, charge: Charge) -> None:
        self._pool = pool
        self.account = account
        self.charge = charge
        self.released = False

    def release(self, tokens: int | None = None) -> None:
        if not self.released:
            self.released = True
            self._pool._release(self, tokens)


class Pool:
    def __init__(self, clock: Clock, *, interactive_share: float = 0.0) -> None:
        if not 0.0 <= interactive_share < 1.0:
            raise ValueError(f"the interactive share is a fraction from 0 up to 1, not {interactive_share!r}")
        self._clock = clock
        self._keep = 1.0 - interactive_share
        """What batch work may use of each account's limits."""
        self._accounts: dict[str, Account] = {}
        self._ring: list[Account] = []
        self._cursor = 0
        self._listeners: list[StateListener] = []
        self._learn_listeners: list[StateListener] = []
        self._release_listeners: list[Callable[[], None]] = []
        self._models: frozenset[str] | None = None
        self._capable: dict[tuple[str, frozenset[str]], bool] = {}
        self._ring_stale = False

    # --- membership (driven by the store sync) -------------------------------------------------

    @property
    def accounts(self) -> dict[str, Account]:
        return self._accounts

    def put(self, account: Account) -> None:
        """Add an account or replace one of the same name, keeping its in-flight count, windows and learned
        limits (unless its ``limits_rev`` moved on: an operator told the pool to forget them)."""
        old = self._accounts.get(account.name)
        if old is not None:
            account.in_flight = old.in_flight
            account.streak = old.streak
            account.limits.carry_over(old.limits, learned=account.limits_rev == old.limits_rev)
        self._accounts[account.name] = account
        self._stale()
        self._freed()

    def remove(self, name: str) -> None:
        if self._accounts.pop(name, None) is not None:
            self._stale()

    def _stale(self) -> None:
        self._models = None
        self._capable.clear()
        self._ring_stale = True

    def _rebuild(self) -> None:
        self._ring_stale = False
        accounts = list(self._accounts.values())
        if not accounts:
            self._ring = []
            return
        lowest = min(a.weight for a in accounts)
        reps = [max(1, round(a.weight / lowest * 10)) for a in accounts]
        divisor = math.gcd(*reps)
        slots = [((k + 0.5) / (r // divisor), i) for i, r in enumerate(reps) for k in range(r // divisor)]
        slots.sort()
        self._ring = [accounts[i] for _, i in slots]
        self._cursor %= len(self._ring)

    def on_state_change(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def on_learn(self, listener: StateListener) -> None:
        """``listener(account)`` runs when an upstream's 429 has taught the pool one of its limits."""
        self._learn_listeners.append(listener)

    def on_release(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs whenever capacity may have freed (a lease ends, an account returns)."""
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

    def capable(self, model: str, needs: frozenset[str]) -> bool:
        """Whether some account that is not disabled serves ``model`` with all of ``needs`` (cached)."""
        key = (model, needs)
        found = self._capable.get(key)
        if found is None:
            found = self._capable[key] = any(a.can(model, needs) for a in self.serving(model))
        return found

    def kinds_serving(self, model: str) -> set[str]:
        """The kinds of the accounts (not disabled) that serve ``model``."""
        return {a.kind for a in self.serving(model)}

    def serving(self, model: str, needs: frozenset[str] = frozenset()) -> Iterable[Account]:
        return (a for a in self._accounts.values()
                if model in a.models and a.state is not State.DISABLED and (not needs or a.can(model, needs)))

    def _free_at(self, account: Account, now: float, cost: int, batch: bool = False) -> float | None:
        """When ``account`` could take a request of ``cost`` (concurrency aside); None: not without an operator."""
        state_free = account.free_at(now)
        if state_free is None:
            return None
        return max(state_free, account.limits.free_at(now, cost, self._keep if batch else None))

    def _pinned(self, prefer: str | None, model: str, exclude: frozenset[str] | set[str], now: float, cost: int,
                deadline: float | None, batch: bool = False, needs: frozenset[str] = frozenset()) -> Account | None:
        """The preferred account, if the request should wait for it rather than move."""
        if prefer is None:
            return None
        account = self._accounts.get(prefer)
        if account is None or not account.can(model, needs) or prefer in exclude:
            return None
        at = self._free_at(account, now, cost, batch)
        if at is None or (deadline is not None and at > deadline):
            return None
        return account

    def next_free_time(self, model: str, cost: int = 0, exclude: frozenset[str] | set[str] = frozenset(),
                       prefer: str | None = None, deadline: float | None = None, *,
                       batch: bool = False, needs: frozenset[str] = frozenset()) -> float | None:
        """The earliest time some account (the preferred one, if the request waits for it) could take
        the request as far as states and windows go; ``now`` when only concurrency holds it back;
        None when no account could serve it without an operator. ``batch``: within the batch share."""
        now = self._clock.time()
        pinned = self._pinned(prefer, model, exclude, now, cost, deadline, batch, needs)
        if pinned is not None:
            return self._free_at(pinned, now, cost, batch)
        times = [t for a in self.serving(model, needs) if a.name not in exclude
                 if (t := self._free_at(a, now, cost, batch)) is not None]
        return min(times) if times else None

    def next_free_in(self, model: str, cost: int = 0, needs: frozenset[str] = frozenset()) -> float | None:
        """Seconds until some account could take ``model``; None if none can without an operator."""
        at = self.next_free_time(model, cost, needs=needs)
        return None if at is None else max(0.0, at - self._clock.time())

    def refresh_states(self) -> None:
        """Bring back every account whose cooldown or timed quota has run out (telling the state
        listeners), as a request that tried it would."""
        now = self._clock.time()
        for account in list(self._accounts.values()):
            if account.state in (State.COOLING_DOWN, State.QUOTA_EXHAUSTED):
                self._refresh(account, now)

    def ready(self, model: str) -> int:
        """How many accounts could take a request for ``model`` now: active, with a free slot and room
        in their windows (``/v1/pool/status`` shows it to client keys)."""
        now = self._clock.time()
        return sum(1 for account in list(self._accounts.values()) if self._fits(account, model, frozenset(), now, 0))

    # --- scheduling ----------------------------------------------------------------------------

    def acquire(self, model: str, cost: int = 0, exclude: frozenset[str] | set[str] = frozenset(), *,
                prefer: str | None = None, deadline: float | None = None, batch: bool = False,
                needs: frozenset[str] = frozenset()) -> Lease | None:
        """Take an account that can serve ``model`` with ``cost`` tokens now, or None.

        With ``prefer``, that account is taken if it can serve now; if it could before ``deadline``
        the answer is None (wait for it); otherwise round robin picks another (the session moves).
        With ``batch``, only an account with room within the batch share is taken. With ``needs``, only an
        account that can serve all of them (``Account.can``).
        """
        now = self._clock.time()
        fits = self._fits_batch if batch else self._fits
        if prefer is not None:
            account = self._accounts.get(prefer)
            if account is not None and fits(account, model, exclude, now, cost) \
                    and (not needs or account.can(model, needs)):
                return self._take(account, now, cost)
            if self._pinned(prefer, model, exclude, now, cost, deadline, batch, needs) is not None:
                return None
        if self._ring_stale:
            self._rebuild()
        ring = self._ring
        size = len(ring)
        start = self._cursor
        for step in range(size):
            account = ring[(start + step) % size]
            if fits(account, model, exclude, now, cost) and (not needs or account.can(model, needs)):
                self._cursor = (start + step + 1) % size
                return self._take(account, now, cost)
        return None

    def _fits(self, account: Account, model: str, exclude: frozenset[str] | set[str], now: float, cost: int) -> bool:
        if account.state is not State.ACTIVE and not self._refresh(account, now):
            return False
        return (model in account.models and account.name not in exclude and account.has_room()
                and account.limits.fits(now, cost))

    def _fits_batch(self, account: Account, model: str, exclude: frozenset[str] | set[str], now: float,
                    cost: int) -> bool:
        if account.state is not State.ACTIVE and not self._refresh(account, now):
            return False
        limits = account.limits
        return (model in account.models and account.name not in exclude
                and limits.has_room_batch(account.in_flight, self._keep) and limits.fits_batch(now, cost, self._keep))

    def _take(self, account: Account, now: float, cost: int) -> Lease:
        account.in_flight += 1
        return Lease(self, account, account.limits.charge(now, cost))

    def _refresh(self, account: Account, now: float) -> bool:
        if account.refresh(now):
            self._changed(account)
        return account.state is State.ACTIVE

    def _current(self, account: Account) -> Account:
        """The live object for this account (a reload may have replaced the one a lease holds)."""
        return self._accounts.get(account.name, account)

    def _release(self, lease: Lease, tokens: int | None) -> None:
        account = lease.account
        current = self._current(account)
        if current is not account:
            account.in_flight -= 1
        current.in_flight -= 1
        current.limits.settle(lease.charge, tokens, self._clock.time())
        self._freed()

    def _freed(self) -> None:
        for listener in self._release_listeners:
            listener()

    # --- outcomes ------------------------------------------------------------------------------

    def succeeded(self, account: Account) -> None:
        self._current(account).streak = 0

    def report(self, account: Account, error: UpstreamError) -> None:
        """Change the account's state (and learned limits) as the classified upstream failure says."""
        account = self._current(account)
        if account.state in (State.DISABLED, State.AUTH_DEAD):
            return
        now = self._clock.time()
        if isinstance(error, AuthDead):
            account.kill(error.message)
        elif isinstance(error, QuotaExhausted):
            account.exhaust(error.until, error.message)
        elif isinstance(error, RateLimited):
            if account.limits.learn(error.bucket, error.limit, account.in_flight, now):
                for listener in self._learn_listeners:
                    listener(account)
            if account.state is State.QUOTA_EXHAUSTED:
                return
            asked = max(error.retry_after, 1.0)  # the upstream's own wait is honoured in full; repeats
            wait = max(asked, min(MAX_COOLDOWN, asked * (2 ** min(account.streak, 8))))  # escalate up to 5 min
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
        self._capable.clear()
        for listener in self._listeners:
            listener(account)
