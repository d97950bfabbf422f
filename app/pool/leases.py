"""Where the dispatcher gets its accounts: a lease, the session it belongs to, and what it reports back.

``Leases`` is the dispatcher's whole view of the pool. ``PoolLeases`` answers from the pool, the
admission queue and the session table of this process; with ``serve --workers N`` the workers use
``app.workers.client.RemoteLeases`` instead, which asks the one process that holds them (the keeper),
so limits, cooldowns, sessions and the round-robin position stay one set for every worker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from app.clock import Clock
from app.pool.account import Account
from app.pool.admission import Admission
from app.pool.census import unserved
from app.pool.context import RequestContext
from app.pool.headroom import Headroom
from app.pool.scheduler import Pool
from app.pool.sessions import Binding, SessionTable

if TYPE_CHECKING:
    from app.errors import KimiPoolError, UpstreamError
    from app.upstreams.base import Thread


class Held(Protocol):
    """An account taken for one request. ``release`` gives it back (once) and trues up the cost."""

    @property
    def account(self) -> Account: ...

    def release(self, tokens: int | None = None) -> None: ...


class Leases(Protocol):
    def models(self) -> frozenset[str]:
        """Models some enabled account serves (asked on every request: must be cheap)."""
        ...

    def try_take(self, model: str, cost: int, ctx: RequestContext, exclude: set[str]) -> Held | None:
        """``take`` when it needs no waiting (the common case, without a coroutine); None: call ``take``."""
        ...

    async def take(self, model: str, cost: int, ctx: RequestContext, exclude: set[str]) -> Held:
        """An account for the request, waiting up to ``ctx.max_wait`` for one with room; the session's
        account when it can take it (``ctx.binding`` is set to the session's binding). ``PoolBusy`` or
        ``PoolUnavailable`` when none can."""
        ...

    def report(self, held: Held, error: UpstreamError) -> None:
        """The upstream failed on this lease (before it is released): cool or retire the account."""
        ...

    def succeeded(self, held: Held) -> None: ...

    async def saved(self) -> None:
        """Return once the account states reported so far are stored, so that a server killed right
        after (a cooldown begun, a key found dead) still respects them when it starts again."""
        ...

    def keep_thread(self, ctx: RequestContext, thread: Thread) -> None:
        """Remember in the session where its upstream chat now stands."""
        ...

    async def next_free_in(self, model: str, needs: frozenset[str] = frozenset()) -> float | None:
        """Seconds until some account could take ``model`` (with ``needs``); None if none can without an
        operator."""
        ...

    def capable(self, model: str, needs: frozenset[str]) -> bool:
        """Whether some account (not disabled) serves ``model`` with all of ``needs`` (asked on every request
        that needs anything: must be cheap)."""
        ...

    def kinds_serving(self, model: str) -> set[str]:
        """The account kinds (not disabled) serving ``model``, for error messages."""
        ...

    def unserved(self, model: str) -> KimiPoolError:
        """The error for a request for ``model``, which no enabled account serves: why, and what fixes it
        (``app.pool.census.unserved``)."""
        ...

    def headroom(self, model: str, now: float) -> list[tuple[bytes, bytes]]:
        """The ``x-ratelimit-*`` headers for ``model``."""
        ...


class PoolLeases:
    """``Leases`` from this process's pool, admission queue and session table."""

    def __init__(self, pool: Pool, admission: Admission, sessions: SessionTable, clock: Clock, *,
                 saved: Callable[[], Awaitable[None]] | None = None) -> None:
        """``saved``: returns once the pool's state changes are stored (``StateWriter.saved``)."""
        self._pool = pool
        self._saved = saved
        self._admission = admission
        self._sessions = sessions
        self._clock = clock
        self._headroom = Headroom(pool)
        self.models = pool.models

    async def take(self, model: str, cost: int, ctx: RequestContext, exclude: set[str]) -> Held:
        now = self._clock.time()
        binding = self._sessions.get(ctx.session, now) if ctx.session else None
        lease = await self._admission.wait_or_refuse(
            model, cost, client=ctx.client, deadline=now + ctx.max_wait, exclude=exclude,
            prefer=binding.account if binding else None, batch=ctx.batch, needs=ctx.needs)
        if ctx.session:
            ctx.binding = self.bound(ctx.session, binding, lease.account.name, ctx.client)
        return lease

    def try_take(self, model: str, cost: int, ctx: RequestContext, exclude: set[str]) -> Held | None:
        """``take`` when it needs no waiting (the common case); None when it might (then call ``take``)."""
        now = self._clock.time()
        binding = self._sessions.get(ctx.session, now) if ctx.session else None
        lease = self._admission.try_acquire(model, cost, deadline=now + ctx.max_wait, exclude=exclude,
                                            prefer=binding.account if binding else None, batch=ctx.batch,
                                            needs=ctx.needs)
        if lease is not None and ctx.session:
            ctx.binding = self.bound(ctx.session, binding, lease.account.name, ctx.client)
        return lease

    def bound(self, session: str, binding: Binding | None, account: str, client: str | None = None) -> Binding:
        """The session's binding now that ``account`` took its request for ``client``: new, moved or touched."""
        if binding is None or binding.account != account:
            return self._sessions.bind(session, account, self._clock.time(), client)  # new, or the session moves
        self._sessions.touch(binding, self._clock.time())
        return binding

    def report(self, held: Held, error: UpstreamError) -> None:
        self._pool.report(held.account, error)

    def succeeded(self, held: Held) -> None:
        self._pool.succeeded(held.account)

    async def saved(self) -> None:
        if self._saved is not None:
            await self._saved()

    def keep_thread(self, ctx: RequestContext, thread: Thread) -> None:
        binding = ctx.binding
        if binding is None or thread.chat_id is None:
            return
        if (binding.chat_id, binding.parent_id, binding.turns) != (thread.chat_id, thread.parent_id, thread.turns):
            self._sessions.set_upstream(binding, thread.chat_id, thread.parent_id, self._clock.time(),
                                        turns=thread.turns)

    def set_thread(self, session: str, account: str, chat_id: str | None, parent_id: str | None,
                   turns: int) -> None:
        """``keep_thread`` for a session named by key (a worker's report, through the keeper)."""
        binding = self._sessions.get(session, self._clock.time())
        if binding is not None and binding.account == account:
            self._sessions.set_upstream(binding, chat_id, parent_id, self._clock.time(), turns=turns)

    async def next_free_in(self, model: str, needs: frozenset[str] = frozenset()) -> float | None:
        return self._pool.next_free_in(model, needs=needs)

    def capable(self, model: str, needs: frozenset[str]) -> bool:
        return self._pool.capable(model, needs)

    def kinds_serving(self, model: str) -> set[str]:
        return self._pool.kinds_serving(model)

    def unserved(self, model: str) -> KimiPoolError:
        return unserved(self._pool, model)

    def headroom(self, model: str, now: float) -> list[tuple[bytes, bytes]]:
        return self._headroom.headers(model, now)
