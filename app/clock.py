"""Time, injected.

Everything time-based (cooldowns, windows, nonce and token expiry, emulator latency) asks a
``Clock``. Production uses ``SystemClock``; tests use ``ManualClock`` and move time by hand, so a
60-second window or a 30-day token expires without anybody sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def sleep_until(self, when: float) -> None:
        """Return at time ``when`` (at once if it has passed): for deadlines, which are absolute."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.time()))


class ManualClock:
    """A clock that only moves when told to. ``sleep`` returns once ``advance`` passes its deadline.

    ``wait_for_sleepers`` lets a test wait, without polling, until the code under test has gone to
    sleep on the clock, so that the next ``advance`` is sure to wake it.
    """

    def __init__(self, start: float = 1_760_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._registered = asyncio.Event()  # set by every ``sleep`` that registers a sleeper

    def time(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._now + seconds)

    async def sleep_until(self, when: float) -> None:
        if when <= self._now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (when, next(self._seq), future))
        self._registered.set()
        await future

    def advance(self, seconds: float) -> None:
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Return once at least ``count`` sleepers wait on the clock (at once if they already do)."""
        while self.sleepers < count:
            self._registered.clear()
            await self._registered.wait()
