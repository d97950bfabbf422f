"""Usage windows for emulated rate limits: a sliding window and a calendar-day counter.

Both are fed the time by their caller (who asks the injected clock), so tests move windows by
advancing a ``ManualClock``. Adding and reading are O(1) amortised: expired entries leave a deque
from the left, and the running total is kept alongside.
"""

from __future__ import annotations

import math
from collections import deque


class SlidingWindow:
    """Amounts charged in the last ``span`` seconds (RPM: amount 1 per request; TPM: tokens)."""

    __slots__ = ("_entries", "_total", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self._entries: deque[tuple[float, int]] = deque()
        self._total = 0

    def _expire(self, now: float) -> None:
        entries = self._entries
        horizon = now - self.span
        while entries and entries[0][0] <= horizon:
            self._total -= entries.popleft()[1]

    def used(self, now: float) -> int:
        self._expire(now)
        return self._total

    def add(self, now: float, amount: int) -> None:
        self._expire(now)
        self._entries.append((now, amount))
        self._total += amount

    def wait(self, now: float, amount: int, limit: int) -> float:
        """Seconds until ``amount`` more fits under ``limit`` (0 if it fits now; ``span`` if never)."""
        self._expire(now)
        excess = self._total + amount - limit
        if excess <= 0:
            return 0.0
        if amount > limit:
            return self.span
        freed = 0
        for stamp, charged in self._entries:
            freed += charged
            if freed >= excess:
                return stamp + self.span - now
        return self.span  # pragma: no cover - the loop frees everything, which always suffices

    def reset_in(self, now: float) -> float:
        """Seconds until the oldest charge leaves the window (0 when empty)."""
        self._expire(now)
        return self._entries[0][0] + self.span - now if self._entries else 0.0

    def clear(self) -> None:
        self._entries.clear()
        self._total = 0


class DayWindow:
    """Amounts charged since the last midnight (UTC), reset when the day rolls over."""

    __slots__ = ("_day", "_total")

    def __init__(self) -> None:
        self._day = -1
        self._total = 0

    def _roll(self, now: float) -> None:
        day = math.floor(now / 86_400)
        if day != self._day:
            self._day = day
            self._total = 0

    def used(self, now: float) -> int:
        self._roll(now)
        return self._total

    def add(self, now: float, amount: int) -> None:
        self._roll(now)
        self._total += amount

    def wait(self, now: float, amount: int, limit: int) -> float:
        self._roll(now)
        if self._total + amount <= limit:
            return 0.0
        return (self._day + 1) * 86_400 - now

    def clear(self) -> None:
        self._day = -1
        self._total = 0
