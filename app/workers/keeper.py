"""The keeper's side of the lease channel: the one pool, admission queue and session table that every
worker of ``serve --workers N`` leases from.

Per worker connection:

- ``take [rid, model, cost, client, max_wait, session, exclude, batch, needs]`` → ``lease [rid, lease_id,
  account, binding, headroom]`` (``binding``: ``[chat_id, parent_id, turns]`` of the session, or
  null; ``headroom``: the ``x-ratelimit-*`` header pairs when they changed since last sent) or
  ``refused [rid, "busy"|"full"|"unavailable", message, retry_after, code]``. A take may wait in the
  admission queue; ``drop [rid]`` withdraws it (the client left).
- ``release [lease_id, tokens, succeeded]``, ``report [lease_id, error]``: the lease's end (and whether
  the upstream answered), or the classified upstream failure (before its release, as in one process).
- ``thread [session, account, chat_id, parent_id, turns]``: where the session's upstream chat stands.
- ``failed [request_id, account, error]`` and ``done [record, waited_ms, first_byte_ms]``: for the
  metrics; ``done`` of a dispatched request (``waited_ms`` not null) is also its usage row.
- ``free_in [rid, model, needs]`` → ``free_in [rid, seconds|null]``.
- ``saved [rid]`` → ``saved [rid]`` once the account states changed by the reports before it are
  stored (``PoolLeases.saved``).
- ``hello [index, pid]``: the worker is serving. The keeper sends ``reload [n]`` after each account
  sync (and to a worker when it says hello); the worker answers ``reloaded [n]`` once it has reloaded.

A worker that goes away (crash, kill) has its waiting takes withdrawn and its leases released.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from app.clock import Clock
from app.dispatch import RequestObserver, UsageSink
from app.errors import PoolBusy, PoolUnavailable, QueueFull
from app.pool.context import RequestContext
from app.pool.leases import Held, PoolLeases
from app.store.records import UsageRecord
from app.workers.wire import Frame, FrameProtocol, decode_error

log = logging.getLogger("kimi_pool.workers")


class LeaseServer:
    def __init__(self, leases: PoolLeases, usage: UsageSink, observers: Sequence[RequestObserver], clock: Clock,
                 *, on_hello: Callable[[int, int], None] | None = None) -> None:
        self._leases = leases
        self._usage = usage
        self._observers = tuple(observers)
        self._clock = clock
        self._on_hello = on_hello
        self._connections: set[_WorkerConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._lease_ids = itertools.count(1)
        self._reloads = 0
        self._acks = asyncio.Condition()

    async def start(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connect, path)
        os.chmod(path, 0o600)

    def _connect(self) -> FrameProtocol:
        connection = _WorkerConnection(self)
        self._connections.add(connection)
        return connection.protocol

    def broadcast_reload(self) -> None:
        """Tell every worker to reload the accounts and keys (after the keeper did)."""
        self._reloads += 1
        for connection in self._connections:
            connection.send(["reload", self._reloads])

    async def caught_up(self, timeout: float = 5.0) -> None:
        """Return once every serving worker has reloaded since the last ``broadcast_reload`` (or after
        ``timeout`` seconds, with a warning: a stuck worker must not hold up the keeper)."""
        target = self._reloads

        def done() -> bool:
            return all(c.acked >= target for c in self._connections if c.serving)

        try:
            async with asyncio.timeout(timeout), self._acks:
                await self._acks.wait_for(done)
        except TimeoutError:
            late = ", ".join(c.worker for c in self._connections if c.serving and c.acked < target)
            log.warning("worker(s) %s did not reload within %.0f s", late, timeout)

    async def acked(self) -> None:
        """A worker reloaded, or went away: wake ``caught_up``."""
        async with self._acks:
            self._acks.notify_all()

    def reload_count(self) -> int:
        return self._reloads

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                connection.close()
            await self._server.wait_closed()

    def next_lease_id(self) -> int:
        return next(self._lease_ids)


class _WorkerConnection:
    def __init__(self, server: LeaseServer) -> None:
        self._server = server
        self._leases = server._leases
        self.protocol = self._protocol = FrameProtocol(self._on_frame, self._on_lost)
        self._held: dict[int, Held] = {}
        self._takes: dict[int, asyncio.Task[None]] = {}
        self._sent_headroom: dict[str, list[tuple[bytes, bytes]]] = {}
        self._handlers: dict[str, Callable[[Frame], None]] = {
            "take": self._take, "drop": self._drop, "release": self._release,
            "report": self._report, "failed": self._failed, "thread": self._thread, "done": self._done,
            "free_in": self._free_in, "hello": self._hello, "saved": self._saved, "reloaded": self._reloaded,
        }
        self.worker = "?"
        self.serving = False
        """The worker said hello: it is serving, and it answers ``reload``."""
        self.acked = 0
        """The last ``reload`` the worker has done."""

    def send(self, frame: Frame) -> None:
        self._protocol.send(frame)

    def close(self) -> None:
        self._protocol.close()

    def _on_frame(self, frame: Frame) -> None:
        handler = self._handlers.get(frame[0])
        if handler is None:
            log.warning("lease channel: unknown message %r from worker %s", frame[0], self.worker)
            return
        handler(frame)

    def _on_lost(self) -> None:
        self._server._connections.discard(self)
        _spawn(self._server.acked())
        for task in self._takes.values():
            task.cancel()
        self._takes.clear()
        held, self._held = self._held, {}
        for lease in held.values():
            lease.release()
        if held:
            log.warning("worker %s went away holding %d lease(s); released", self.worker, len(held))

    # --- messages ------------------------------------------------------------------------------

    def _hello(self, frame: Frame) -> None:
        index, pid = int(frame[1]), int(frame[2])
        self.worker = f"{index} (pid {pid})"
        self.serving = True
        self.send(["reload", self._server.reload_count()])  # what changed while it started
        if self._server._on_hello is not None:
            self._server._on_hello(index, pid)

    def _reloaded(self, frame: Frame) -> None:
        self.acked = max(self.acked, int(frame[1]))
        _spawn(self._server.acked())

    def _take(self, frame: Frame) -> None:
        rid, model, cost, client, max_wait, session, exclude, batch, needs = frame[1:]
        ctx = RequestContext("", client, max_wait=max_wait, session=session, batch=batch, needs=frozenset(needs))
        lease = self._leases.try_take(model, cost, ctx, set(exclude))
        if lease is not None:  # most takes: no task, no waiting
            self._grant(rid, model, ctx, lease)
        else:
            self._takes[rid] = asyncio.create_task(self._taking(rid, model, cost, ctx, set(exclude)))

    async def _taking(self, rid: int, model: str, cost: int, ctx: RequestContext, exclude: set[str]) -> None:
        try:
            lease = await self._leases.take(model, cost, ctx, exclude)
        except PoolBusy as error:
            why = "full" if isinstance(error, QueueFull) else "busy"
            self.send(["refused", rid, why, error.message, error.retry_after, error.code])
            return
        except PoolUnavailable as error:
            self.send(["refused", rid, "unavailable", error.message, error.retry_after, error.code])
            return
        finally:
            self._takes.pop(rid, None)
        if self._protocol.closed:
            lease.release()
            return
        self._grant(rid, model, ctx, lease)

    def _grant(self, rid: int, model: str, ctx: RequestContext, lease: Held) -> None:
        lease_id = self._server.next_lease_id()
        self._held[lease_id] = lease
        binding = ctx.binding
        headroom: Any = self._leases.headroom(model, self._server._clock.time())
        if self._sent_headroom.get(model) is headroom:
            headroom = None
        else:
            self._sent_headroom[model] = headroom
            headroom = [[k.decode(), v.decode()] for k, v in headroom]
        self.send(["lease", rid, lease_id, lease.account.name,
                   None if binding is None else [binding.chat_id, binding.parent_id, binding.turns], headroom])

    def _drop(self, frame: Frame) -> None:
        task = self._takes.pop(frame[1], None)
        if task is not None:
            task.cancel()

    def _release(self, frame: Frame) -> None:
        lease = self._held.pop(frame[1], None)
        if lease is not None:
            if len(frame) > 3 and frame[3]:
                self._leases.succeeded(lease)
            lease.release(frame[2])

    def _report(self, frame: Frame) -> None:
        lease = self._held.get(frame[1])
        if lease is not None:
            self._leases.report(lease, decode_error(frame[2]))

    def _failed(self, frame: Frame) -> None:
        error = decode_error(frame[3])
        for observer in self._server._observers:
            observer.upstream_failed(frame[1], frame[2], error)

    def _thread(self, frame: Frame) -> None:
        self._leases.set_thread(frame[1], frame[2], frame[3], frame[4], int(frame[5]))

    def _done(self, frame: Frame) -> None:
        record = UsageRecord(**frame[1])
        waited_ms, first_byte_ms = frame[2], frame[3]
        if waited_ms is not None:
            self._server._usage.put_usage(record)
        for observer in self._server._observers:
            observer.finished(record, waited_ms, first_byte_ms)

    def _saved(self, frame: Frame) -> None:
        rid = frame[1]

        async def answer() -> None:
            await self._leases.saved()
            self.send(["saved", rid])

        _spawn(answer())

    def _free_in(self, frame: Frame) -> None:
        rid, model, needs = frame[1], frame[2], frozenset(frame[3])

        async def answer() -> None:
            self.send(["free_in", rid, await self._leases.next_free_in(model, needs)])

        _spawn(answer())


def _spawn(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.create_task(work)
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        if task.exception() is not None:
            log.error("lease channel: %s", task.exception())

