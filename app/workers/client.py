"""A worker's side of the lease channel (``app.workers.keeper`` has the messages): ``Leases`` and a
request observer that ask and tell the keeper, so every worker shares its pool.

The worker keeps its own copy of the accounts (``AccountSync`` into a local ``Pool``, reloaded when
the keeper says ``reload``) for what the adapters need — credentials, base URL, models — and never
schedules on it: which account takes a request, and every limit, cooldown and session, is the
keeper's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Awaitable, Callable

from app.errors import (
    AuthDead,
    KimiPoolError,
    PoolBusy,
    PoolUnavailable,
    QueueFull,
    QuotaExhausted,
    RateLimited,
    UpstreamError,
)
from app.pool.account import Account
from app.pool.census import unserved
from app.pool.context import RequestContext
from app.pool.leases import Held
from app.pool.scheduler import Pool
from app.pool.sessions import Binding
from app.store.records import UsageRecord
from app.upstreams.base import Thread
from app.workers.wire import Frame, FrameProtocol, encode_error

log = logging.getLogger("kimi_pool.workers")


class KeeperLost(Exception):
    """The lease channel closed: the keeper is gone."""


class KeeperLink:
    """The connection to the keeper; answers are matched to questions by request id."""

    def __init__(self, on_reload: Callable[[], Awaitable[None]], on_lost: Callable[[], None]) -> None:
        self._on_reload = on_reload
        self._on_lost = on_lost
        self._protocol = FrameProtocol(self._on_frame, self._lost)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._ids = itertools.count(1)
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        self._reload_asked = 0  # the latest ``reload [n]`` the keeper sent
        self.closing = False

    async def connect(self, path: str) -> None:
        await asyncio.get_running_loop().create_unix_connection(lambda: self._protocol, path)

    def send(self, frame: Frame) -> None:
        self._protocol.send(frame)

    def ask(self, make: Callable[[int], Frame]) -> tuple[int, asyncio.Future[Frame]]:
        if self._protocol.closed:
            raise KeeperLost("the keeper process is gone")
        rid = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        self.send(make(rid))
        return rid, future

    def forget(self, rid: int) -> bool:
        """Stop waiting for the answer to ``rid``; False if it had already come."""
        return self._pending.pop(rid, None) is not None

    def close(self) -> None:
        self.closing = True
        self._protocol.close()

    def _on_frame(self, frame: Frame) -> None:
        kind = frame[0]
        if kind == "reload":
            self._reload_asked = max(self._reload_asked, int(frame[1]))
            self._reload()
            return
        future = self._pending.pop(frame[1], None)
        if future is None:
            if kind == "lease":  # granted after the request gave up waiting: give it straight back
                self.send(["release", frame[2], 0])
            return
        if not future.done():
            future.set_result(frame)

    def _reload(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            asked = self._reload_asked
            try:
                await self._on_reload()
            except Exception:
                log.exception("reloading accounts after the keeper's notice failed")
            else:
                self.send(["reloaded", asked])  # the keeper tells a waiting CLI that every worker has it
            if not self._reload_again:
                return

    def _lost(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(KeeperLost("the keeper process is gone"))
        self._pending.clear()
        if not self.closing:
            self._on_lost()


class RemoteLease:
    __slots__ = ("_link", "account", "id", "released", "succeeded")

    def __init__(self, link: KeeperLink, lease_id: int, account: Account) -> None:
        self._link = link
        self.id = lease_id
        self.account = account
        self.released = False
        self.succeeded = False
        """The upstream answered: told to the keeper with the release (one message, not two)."""

    def release(self, tokens: int | None = None) -> None:
        if not self.released:
            self.released = True
            self._link.send(["release", self.id, tokens, self.succeeded])


class RemoteLeases:
    """``Leases`` answered by the keeper. ``accounts`` is this worker's copy of the accounts (models
    and what the adapters need); ``reload`` brings it up to date when it lacks an account the keeper
    leased."""

    def __init__(self, link: KeeperLink, accounts: Pool, reload: Callable[[], Awaitable[None]]) -> None:
        self._link = link
        self._accounts = accounts
        self._reload = reload
        self._headroom: dict[str, list[tuple[bytes, bytes]]] = {}
        self._reported = 0  # reports sent that may have changed an account's state
        self._confirmed = 0  # of those, how many the keeper has confirmed stored
        self.models = accounts.models

    def try_take(self, model: str, cost: int, ctx: RequestContext, exclude: set[str]) -> Held | None:
        return None  # the keeper decides: always a round trip

    async def take(self, model: str, cost: int, ctx: RequestContext, exclude: set[str]) -> Held:
        link = self._link
        try:
            rid, future = link.ask(lambda rid: ["take", rid, model, cost, ctx.client, ctx.max_wait, ctx.session,
                                                list(exclude), ctx.batch, sorted(ctx.needs)])
        except KeeperLost:
            raise PoolUnavailable("This kimi-pool worker lost its keeper process; retry shortly.",
                                  retry_after=1.0) from None
        try:
            frame = await future
        except asyncio.CancelledError:
            if link.forget(rid):
                link.send(["drop", rid])
            elif (future.done() and not future.cancelled() and future.exception() is None
                  and future.result()[0] == "lease"):
                link.send(["release", future.result()[2], 0])  # granted just as the client left
            raise
        except KeeperLost:
            raise PoolUnavailable("This kimi-pool worker lost its keeper process; retry shortly.",
                                  retry_after=1.0) from None
        if frame[0] == "refused":
            _, _, why, message, retry_after, code = frame
            if why == "busy":
                raise PoolBusy(message, retry_after=retry_after, code=code)
            if why == "full":
                raise QueueFull(message, retry_after=retry_after)
            raise PoolUnavailable(message, retry_after=retry_after)
        _, _, lease_id, name, binding, headroom = frame
        if headroom is not None:
            self._headroom[model] = [(k.encode(), v.encode()) for k, v in headroom]
        account = self._accounts.accounts.get(name)
        if account is None:  # added a moment ago: the keeper has synced, this worker not yet
            await self._reload()
            account = self._accounts.accounts.get(name)
            if account is None:
                link.send(["release", lease_id, 0])
                raise PoolUnavailable(f"The account {name} is not known to this worker; retry shortly.",
                                      retry_after=1.0)
        if ctx.session and binding is not None:
            chat_id, parent_id, turns = binding
            ctx.binding = Binding(key=ctx.session, account=name, chat_id=chat_id, parent_id=parent_id, turns=turns,
                                  last_used=0.0, expires_at=0.0)
        return RemoteLease(link, lease_id, account)

    def report(self, held: Held, error: UpstreamError) -> None:
        assert isinstance(held, RemoteLease)
        self._link.send(["report", held.id, encode_error(error)])
        if isinstance(error, AuthDead | QuotaExhausted | RateLimited):  # what the pool acts on
            self._reported += 1

    async def saved(self) -> None:
        """Ask the keeper (after the reports, on the same channel) to confirm they are stored; no
        round trip when every report that could have changed a state is confirmed already."""
        target = self._reported
        if self._confirmed >= target:
            return
        try:
            _, future = self._link.ask(lambda rid: ["saved", rid])
            await future
        except KeeperLost:
            return
        self._confirmed = max(self._confirmed, target)

    def succeeded(self, held: Held) -> None:
        assert isinstance(held, RemoteLease)
        held.succeeded = True

    def keep_thread(self, ctx: RequestContext, thread: Thread) -> None:
        binding = ctx.binding
        if binding is None or thread.chat_id is None:
            return
        if (binding.chat_id, binding.parent_id, binding.turns) != (thread.chat_id, thread.parent_id, thread.turns):
            binding.chat_id, binding.parent_id, binding.turns = thread.chat_id, thread.parent_id, thread.turns
            self._link.send(["thread", binding.key, binding.account, thread.chat_id, thread.parent_id, thread.turns])

    async def next_free_in(self, model: str, needs: frozenset[str] = frozenset()) -> float | None:
        try:
            _, future = self._link.ask(lambda rid: ["free_in", rid, model, sorted(needs)])
            frame = await future
        except KeeperLost:
            return None
        value: float | None = frame[2]
        return value

    def capable(self, model: str, needs: frozenset[str]) -> bool:
        return self._accounts.capable(model, needs)

    def kinds_serving(self, model: str) -> set[str]:
        return self._accounts.kinds_serving(model)

    def unserved(self, model: str) -> KimiPoolError:
        return unserved(self._accounts, model)

    def headroom(self, model: str, now: float) -> list[tuple[bytes, bytes]]:
        return self._headroom.get(model, [])


class RemoteObserver:
    """Tells the keeper of each finished request (its metrics, and the usage row) and each failed
    upstream attempt (its metrics)."""

    def __init__(self, link: KeeperLink) -> None:
        self._link = link

    def finished(self, record: UsageRecord, waited_ms: float | None, first_byte_ms: float | None) -> None:
        self._link.send(["done", record, waited_ms, first_byte_ms])

    def upstream_failed(self, request_id: str, account: str, error: UpstreamError) -> None:
        self._link.send(["failed", request_id, account, encode_error(error)])


class NoUsage:
    """A worker's usage sink: the record reaches the keeper's store through ``RemoteObserver``."""

    def put_usage(self, record: UsageRecord) -> None:
        pass


def hello(link: KeeperLink, index: int) -> None:
    link.send(["hello", index, os.getpid()])

