"""The keeper's workers: started, watched, restarted when they die, stopped with the keeper.

Each worker gets its own listening socket on the gateway's address (``SO_REUSEPORT``: the kernel
spreads new connections over them). The keeper creates the sockets and keeps them, so a worker that
dies loses no queued connection: its replacement serves the same socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

import orjson

from app.clock import Clock
from app.config import Settings
from app.dispatch import RequestObserver, UsageSink
from app.errors import ConfigError
from app.pool.leases import PoolLeases
from app.sync import AccountSync
from app.workers.keeper import LeaseServer
from app.workers.worker import LEASES_SOCKET, settings_to_json

log = logging.getLogger("kimi_pool.workers")

STOP_MARGIN = 10.0
"""Seconds a stopping worker gets beyond the shutdown grace before it is killed."""


def listen(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``host:port``, sharing it through ``SO_REUSEPORT``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


class Workers:
    """Runs one worker process per socket; ``start`` and ``stop`` belong to the keeper's lifespan."""

    def __init__(self, settings: Settings, runtime: str, sockets: Sequence[socket.socket], clock: Clock) -> None:
        self._settings = settings
        self._runtime = runtime
        self._sockets = list(sockets)
        self._clock = clock
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: set[int] = set()
        self._announced = False
        self._stopping = False
        self._server: LeaseServer | None = None

    @property
    def status(self) -> dict[str, int]:
        """Workers wanted and serving (``/healthz`` shows it)."""
        return {"wanted": len(self._sockets), "serving": len(self._ready)}

    async def start(self, leases: PoolLeases, usage: UsageSink, observer: RequestObserver,
                    sync: AccountSync) -> None:
        server = LeaseServer(leases, usage, (observer,), self._clock, on_hello=self._hello)
        await server.start(os.path.join(self._runtime, LEASES_SOCKET))
        sync.on_load(server.broadcast_reload)
        self._server = server
        self._tasks = [asyncio.create_task(self._keep_running(index)) for index in range(len(self._sockets))]

    async def caught_up(self) -> None:
        """Return once every serving worker has reloaded the accounts and keys the keeper just loaded."""
        if self._server is not None:
            await self._server.caught_up()

    def signal_stop(self) -> None:
        """The keeper was told to stop: workers stop accepting and finish what they hold."""
        if self._stopping:
            return
        self._stopping = True
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        self.signal_stop()
        running = [p for p in self._processes.values() if p.returncode is None]
        if running:
            waits = [asyncio.ensure_future(p.wait()) for p in running]
            _, late = await asyncio.wait(waits, timeout=self._settings.shutdown_grace + STOP_MARGIN)
            for process in running:
                if process.returncode is None:
                    log.warning("worker pid %d did not stop in time; killing it", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if late:
                await asyncio.wait(late)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.close()
        for sock in self._sockets:
            sock.close()

    def _hello(self, index: int, pid: int) -> None:
        self._ready.add(index)
        log.info("worker %d (pid %d) serving", index, pid)
        if not self._announced and len(self._ready) == len(self._sockets):
            self._announced = True
            log.info("kimi-pool ready: %d workers on http://%s:%d", len(self._sockets), self._settings.host,
                     self._settings.port)

    async def _keep_running(self, index: int) -> None:
        failures = 0
        while not self._stopping:
            started = self._clock.time()
            status = await self._run_once(index)
            self._ready.discard(index)
            if self._stopping:
                return
            failures = failures + 1 if self._clock.time() - started < 10.0 else 0
            delay = 0.0 if failures <= 1 else min(30.0, 0.5 * 2 ** failures)
            log.warning("worker %d exited with status %s; starting a new one%s", index, status,
                        f" in {delay:.0f}s" if delay else "")
            if delay:
                await self._clock.sleep(delay)

    async def _run_once(self, index: int) -> int:
        sock = self._sockets[index]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app.workers.worker", stdin=asyncio.subprocess.PIPE, pass_fds=(sock.fileno(),),
            start_new_session=True)  # a terminal's Ctrl-C reaches the keeper only; it stops the workers
        self._processes[index] = process
        try:
            assert process.stdin is not None
            spec = {"settings": settings_to_json(self._settings), "runtime": self._runtime, "index": index,
                    "fd": sock.fileno()}
            process.stdin.write(orjson.dumps(spec, default=str))
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()
            process.stdin.close()
            return await process.wait()
        finally:
            self._processes.pop(index, None)
