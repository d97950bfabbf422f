"""The admission queue: when no account has room, a request waits instead of failing.

Waiting requests are woken by what frees capacity, never by polling: a lease ending (or an account
coming back) wakes the queue at once; a window rolling over or a cooldown ending wakes it through
one timer on the injected clock, armed for the earliest such moment. Each pass serves the waiting
client keys in turn, one request each, so a batch key with thousands queued cannot starve a chat
UI's key. A request that cannot be served before its deadline is refused at once with the honest
time until the pool could take it; so is one that finds the queue full, or its client key's share
of it (``max_queue_per_key``) taken, so one key cannot fill the queue for all.

*Batch* requests (``batch=True``, the batch runner's) wait in a queue of their own, served only
after every interactive waiter that can be served has been: a waiting chat request always goes
first, and the pool keeps batch work to its share of each account (``Pool``). An interactive request
never queues behind batch waiters, and batch waiters never fill the queue for interactive ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque

from app.clock import Clock
from app.errors import PoolBusy, PoolUnavailable, QueueFull
from app.pool.scheduler import Lease, Pool

LOOKAHEAD = 8
KEY_QUEUE_FULL = "key_queue_share_exceeded"
"""The code of the 429 for a request whose client key has its share of the queue waiting already."""


class _Waiter:
    __slots__ = ("batch", "client", "cost", "deadline", "exclude", "future", "model", "needs", "prefer")

    def __init__(self, model: str, cost: int, client: str, exclude: frozenset[str] | set[str],
                 prefer: str | None, deadline: float, future: asyncio.Future[Lease], batch: bool = False,
                 needs: frozenset[str] = frozenset()) -> None:
        self.batch = batch
        self.needs = needs
        self.model = model
        self.cost = cost
        self.client = client
        self.exclude = exclude
        self.prefer = prefer
        self.deadline = deadline
        self.future = future


class Admission:
    def __init__(self, pool: Pool, clock: Clock, *, max_queue: int = 1000,
                 max_queue_per_key: int | None = None) -> None:
        self._pool = pool
        self._clock = clock
        self._max_queue = max_queue
        self._max_per_key = max_queue if max_queue_per_key is None else max_queue_per_key
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._batch_queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._depth = 0
        self._batch_depth = 0
        self._timer: asyncio.Task[None] | None = None
        self._timer_at = float("inf")
        self.waited = 0
        """Requests that had to wait (a counter for status pages and tests)."""
        self._depth_waiters: list[tuple[int, asyncio.Future[None]]] = []
        pool.on_release(self._wake)

    @property
    def depth(self) -> int:
        """Requests waiting, batch ones included."""
        return self._depth

    @property
    def batch_depth(self) -> int:
        """Batch requests waiting."""
        return self._batch_depth

    async def wait_depth(self, depth: int) -> None:
        """Return once exactly ``depth`` requests are waiting (for status pages and tests)."""
        if self._depth != depth:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._depth_waiters.append((depth, future))
            await future

    def _depth_changed(self) -> None:
        if self._depth_waiters:
            keep = []
            for depth, future in self._depth_waiters:
                if future.done():
                    continue
                if depth == self._depth:
                    future.set_result(None)
                else:
                    keep.append((depth, future))
            self._depth_waiters = keep

    def depth_by_client(self) -> dict[str, int]:
        depths = {client: len(queue) for client, queue in self._queues.items()}
        for client, queue in self._batch_queues.items():
            depths[client] = depths.get(client, 0) + len(queue)
        return depths

    def try_acquire(self, model: str, cost: int, *, deadline: float, exclude: frozenset[str] | set[str] = frozenset(),
                    prefer: str | None = None, batch: bool = False,
                    needs: frozenset[str] = frozenset()) -> Lease | None:
        """A lease at once if one is free and nobody waiting would go first; else None (no waiting)."""
        # an interactive request goes before batch waiters, a batch request after every waiter
        if self._depth == (self._batch_depth if not batch else 0):
            return self._pool.acquire(model, cost, exclude, prefer=prefer, deadline=deadline, batch=batch,
                                      needs=needs)
        return None

    async def acquire(self, model: str, cost: int, *, client: str | None, deadline: float,
                      exclude: frozenset[str] | set[str] = frozenset(), prefer: str | None = None,
                      batch: bool = False, needs: frozenset[str] = frozenset()) -> Lease:
        """A lease for ``model``, waiting until ``deadline`` if need be; ``PoolBusy`` past it.
        ``batch``: the batch runner's request (its share of the pool, after interactive waiters);
        ``needs``: what the account must be able to do (``app.capabilities``)."""
        lease = self.try_acquire(model, cost, deadline=deadline, exclude=exclude, prefer=prefer, batch=batch,
                                 needs=needs)
        if lease is not None:
            return lease
        now = self._clock.time()
        at = self._pool.next_free_time(model, cost, exclude, prefer, deadline, batch=batch, needs=needs)
        if at is None:
            raise PoolUnavailable(f"No account can serve '{model}' now: all are disabled, dead or out of quota.")
        if at > deadline:
            raise PoolBusy(f"Every account serving '{model}' is at its limits; retry in {at - now:.0f}s.",
                           retry_after=at - now)
        if (self._depth if batch else self._depth - self._batch_depth) >= self._max_queue:
            raise QueueFull(f"The queue is full ({self._max_queue} waiting); retry shortly.",
                           retry_after=max(1.0, at - now))
        if not batch and len(self._queues.get(client or "", ())) >= self._max_per_key:
            raise PoolBusy(f"This client key has {self._max_per_key} requests waiting already, its share of the "
                           "queue; retry shortly.", retry_after=max(1.0, at - now), code=KEY_QUEUE_FULL)
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(model, cost, client or "", exclude, prefer, deadline, future, batch, needs)
        self._queues_of(waiter).setdefault(waiter.client, deque()).append(waiter)
        self._depth += 1
        if batch:
            self._batch_depth += 1
        self.waited += 1
        self._depth_changed()
        self._serve()
        try:
            return await self._wait(future, deadline)
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()  # served just as the caller gave up: give it back
            raise
        finally:
            self._forget(waiter)

    async def _wait(self, future: asyncio.Future[Lease], deadline: float) -> Lease:
        timeout = asyncio.ensure_future(self._clock.sleep_until(deadline))
        try:
            await asyncio.wait((future, timeout), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timeout.cancel()
        if future.done():
            return future.result()
        future.cancel()
        raise TimeoutError

    async def wait_or_refuse(self, model: str, cost: int, *, client: str | None, deadline: float,
                             exclude: frozenset[str] | set[str] = frozenset(), prefer: str | None = None,
                             batch: bool = False, needs: frozenset[str] = frozenset()) -> Lease:
        """``acquire``, turning a deadline that passed into ``PoolBusy`` with an honest ``Retry-After``."""
        try:
            return await self.acquire(model, cost, client=client, deadline=deadline, exclude=exclude, prefer=prefer,
                                      batch=batch, needs=needs)
        except TimeoutError:
            at = self._pool.next_free_time(model, cost, exclude, batch=batch, needs=needs)
            if at is None:
                raise PoolUnavailable(
                    f"No account can serve '{model}' now: all are disabled, dead or out of quota.") from None
            wait = max(1.0, at - self._clock.time())
            raise PoolBusy(f"No account serving '{model}' had room before this request's deadline; "
                           f"retry in {wait:.0f}s.", retry_after=wait) from None

    def _queues_of(self, waiter: _Waiter) -> OrderedDict[str, deque[_Waiter]]:
        return self._batch_queues if waiter.batch else self._queues

    def _forget(self, waiter: _Waiter) -> None:
        queues = self._queues_of(waiter)
        queue = queues.get(waiter.client)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._left(waiter)
            if not queue:
                del queues[waiter.client]

    def _left(self, waiter: _Waiter) -> None:
        self._depth -= 1
        if waiter.batch:
            self._batch_depth -= 1
        self._depth_changed()

    # --- serving the queue ----------------------------------------------------------------------

    def _wake(self) -> None:
        if self._depth:
            self._serve()

    def _candidates(self, queue: deque[_Waiter]) -> list[_Waiter]:
        """A client's oldest few waiters: enough to get past one pinned to a busy account, bounded so a
        queue of thousands costs no more than a short one."""
        return [w for _, w in zip(range(LOOKAHEAD), queue, strict=False) if not w.future.done()]

    def _serve(self) -> None:
        """Hand out what fits, one waiter per client key per round, until a round serves nobody;
        interactive waiters first: a batch round runs only when an interactive one served nobody."""
        while self._depth:
            if self._depth > self._batch_depth and self._round(self._queues, False):
                continue
            if not (self._batch_depth and self._round(self._batch_queues, True)):
                break
        if self._depth:
            self._arm_for_windows()

    def _round(self, queues: OrderedDict[str, deque[_Waiter]], batch: bool) -> bool:
        """One waiter per client key, the longest-unserved key first; whether anyone was served."""
        served = False
        full: dict[tuple[str, frozenset[str]], int] = {}  # (model, needs) -> smallest cost that found no room
        for client in list(queues):
            queue = queues.get(client)
            if not queue:
                continue
            got = False
            for waiter in self._candidates(queue):
                kind = (waiter.model, waiter.needs)
                if waiter.prefer is None and not waiter.exclude and waiter.cost >= full.get(kind, 1 << 62):
                    continue
                lease = self._pool.acquire(waiter.model, waiter.cost, waiter.exclude, prefer=waiter.prefer,
                                           deadline=waiter.deadline, batch=batch, needs=waiter.needs)
                if lease is not None:
                    waiter.future.set_result(lease)
                    queue.remove(waiter)
                    self._left(waiter)
                    served = got = True
                    break
                if waiter.prefer is None and not waiter.exclude:
                    full[kind] = min(waiter.cost, full.get(kind, waiter.cost))
            if not queue:
                queues.pop(client, None)
            elif got:
                queues.move_to_end(client)  # served: the others go first next time
        return served

    def _arm_for_windows(self) -> None:
        """Arm the timer for the earliest moment a window rolls or a cooldown ends for a waiter."""
        now = self._clock.time()
        seen: dict[tuple[str, int, str | None, bool, frozenset[str]], float | None] = {}
        earliest = float("inf")
        for queue in (*self._queues.values(), *self._batch_queues.values()):
            for w in self._candidates(queue):
                key = (w.model, w.cost, w.prefer, w.batch, w.needs)
                if key not in seen or w.exclude:
                    seen[key] = self._pool.next_free_time(w.model, w.cost, w.exclude, w.prefer, w.deadline,
                                                          batch=w.batch, needs=w.needs)
                at = seen[key]
                if at is not None and now < at < earliest:
                    earliest = at
        if earliest < float("inf"):
            self._arm(earliest)

    def _arm(self, at: float) -> None:
        """Make sure the queue is looked at again at time ``at`` (one timer, for the earliest moment)."""
        if self._timer is not None and not self._timer.done() and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().create_task(self._tick(at))

    async def _tick(self, at: float) -> None:
        await self._clock.sleep_until(at)
        self._timer_at = float("inf")
        self._serve()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
