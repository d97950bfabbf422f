"""Per-account pacing: concurrency, requests per minute, tokens per minute, tokens per day.

Cost is charged when a request starts (prompt estimate + its ``max_tokens``, the way Moonshot
charges TPM) and trued up with the real usage when it ends. Limits come from the account's
configuration and are *learned* from the upstream: a 429 for a window lowers that window's
effective limit to what the upstream allowed (or the limit its message names), and the limit
recovers by a tenth every ``RECOVER_AFTER`` seconds without another 429 on that window.

Batch work sees the same windows through smaller limits (``fits_batch``, ``has_room_batch``): only
the fraction ``keep`` (1 - the interactive share) of each, so the rest is always there for
interactive requests, which may use the whole.
"""

from __future__ import annotations

from collections import deque

from app.accounts_config import AccountSpec

MINUTE = 60.0
DAY = 86_400.0
DAY_OFFSET = 8 * 3600.0
"""Daily token windows roll over at midnight in China (UTC+8), as Moonshot's do."""
RECOVER_AFTER = 300.0
CEILING = 1_000_000_000
"""A limit learned where none is configured is forgotten once it has grown back past this (from 3 RPM: ~17 h
without another 429); it would otherwise grow without end."""
RESOLUTION = 0.25
"""Seconds per window bucket."""
BUCKETS = ("concurrency", "rpm", "tpm", "tpd")


def batch_limit(limit: int, keep: float) -> int:
    """What batch work may use of ``limit`` when it keeps to the fraction ``keep`` of it (1 - the
    interactive share): rounded down, but never below 1, so an account too small to split (a limit
    of 1) still serves batches, and interactive requests go first in the queue for it."""
    return max(1, int(limit * keep + 1e-9))


class Window:
    """The sum of amounts charged in the last ``span`` seconds, kept in buckets of ``RESOLUTION``.

    Buckets bound the memory and the work to ``span / RESOLUTION`` entries whatever the request
    rate (one entry per request held ~500,000 live objects at 8,000 requests/s, and the garbage
    collector paid for them). A bucket leaves the window when its *last* instant is ``span`` old,
    so the window errs on the safe side by at most one bucket.
    """

    __slots__ = ("_entries", "_total", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self._entries: deque[list[float]] = deque()
        self._total = 0.0

    def _prune(self, now: float) -> None:
        entries = self._entries
        horizon = now - self.span - RESOLUTION
        while entries and entries[0][0] <= horizon:
            self._total -= entries.popleft()[1]

    def used(self, now: float) -> float:
        self._prune(now)
        return self._total

    def add(self, now: float, amount: float) -> list[float]:
        start = now - now % RESOLUTION
        entries = self._entries
        if entries and entries[-1][0] == start:
            entry = entries[-1]
            entry[1] += amount
        else:
            entry = [start, amount]
            entries.append(entry)
        self._total += amount
        return entry

    def adjust(self, entry: list[float], delta: float, now: float) -> None:
        """Change what a bucket holds by ``delta`` (true-up); a bucket that left the window is gone."""
        if entry[0] > now - self.span - RESOLUTION:
            entry[1] += delta
            self._total += delta

    def free_at(self, now: float, need: float, limit: float) -> float:
        """The earliest time ``need`` more fits under ``limit`` (``now`` if it fits already)."""
        self._prune(now)
        excess = self._total + min(need, limit) - limit
        if excess <= 0:
            return now
        for start, amount in self._entries:
            excess -= amount
            if excess <= 0:
                return start + RESOLUTION + self.span
        return now


class DayCounter:
    """Tokens charged since the start of the current day (UTC+8)."""

    __slots__ = ("_day", "used")

    def __init__(self) -> None:
        self._day = -1.0
        self.used = 0.0

    def _roll(self, now: float) -> None:
        day = (now + DAY_OFFSET) // DAY
        if day != self._day:
            self._day = day
            self.used = 0.0

    def add(self, now: float, amount: float) -> None:
        self._roll(now)
        self.used += amount

    def adjust(self, charged_at: float, delta: float, now: float) -> None:
        self._roll(now)
        if (charged_at + DAY_OFFSET) // DAY == self._day:
            self.used = max(0.0, self.used + delta)

    def free_at(self, now: float, need: float, limit: float) -> float:
        self._roll(now)
        if self.used + min(need, limit) <= limit:
            return now
        return next_day(now)

    def current(self, now: float) -> float:
        self._roll(now)
        return self.used


def next_day(now: float) -> float:
    return ((now + DAY_OFFSET) // DAY + 1) * DAY - DAY_OFFSET


class Charge:
    """What one request charged, kept to true it up when the request ends."""

    __slots__ = ("at", "cost", "rpm", "tpm")

    def __init__(self, at: float, cost: int, rpm: list[float] | None, tpm: list[float] | None) -> None:
        self.at = at
        self.cost = cost
        self.rpm = rpm
        self.tpm = tpm


def recovered(learned: int, at: float, now: float, configured: int | None) -> tuple[int, float] | None:
    """A limit learned at ``at``, as it stands at ``now``: it grows by a tenth (at least 1) every
    ``RECOVER_AFTER`` seconds. Returns the limit and the time its next step counts from, or None once it
    has grown back to ``configured`` (without one: past ``CEILING``)."""
    ceiling = CEILING if configured is None else configured
    steps = max(0, int((now - at) // RECOVER_AFTER))
    for _ in range(steps):
        learned += max(1, -(-learned // 10))
        if learned >= ceiling:
            return None
    if learned >= ceiling:
        return None
    return learned, at + steps * RECOVER_AFTER


Learned = dict[str, dict[str, float]]
"""What was learned, as it is stored: bucket → ``{"limit": n, "at": when}``."""


class Limits:
    """The pacing state of one account. ``fits``/``charge``/``settle`` run on every request: O(1)
    amortised (each window entry is pruned once)."""

    __slots__ = ("_learned_at", "configured", "day", "effective", "rpm", "tpm")

    def __init__(self, spec: AccountSpec, learned: Learned | None = None) -> None:
        """``learned``: what the server had learned of this account (stored with it), taken up again."""
        self.configured: dict[str, int | None] = {
            "concurrency": spec.effective_concurrency(), "rpm": spec.rpm, "tpm": spec.tpm, "tpd": spec.tpd}
        self.effective = dict(self.configured)
        self._learned_at: dict[str, float] = {}
        self.rpm = Window(MINUTE)
        self.tpm = Window(MINUTE)
        self.day = DayCounter()
        for bucket, entry in (learned or {}).items():
            try:
                self._adopt(bucket, int(entry["limit"]), float(entry["at"]))
            except (KeyError, TypeError, ValueError):
                continue  # a stored entry this version does not understand: forget it

    def _adopt(self, bucket: str, learned: int | None, at: float) -> None:
        if bucket not in BUCKETS or learned is None:
            return
        configured = self.configured[bucket]
        if configured is None or learned < configured:
            self.effective[bucket] = max(1, learned)
            self._learned_at[bucket] = at

    def carry_over(self, old: Limits, *, learned: bool = True) -> None:
        """Keep the windows and (``learned``) what was learned when the account's configuration is
        reloaded; without ``learned`` (an operator's ``reset-limits``) the configured limits hold again."""
        self.rpm, self.tpm, self.day = old.rpm, old.tpm, old.day
        self.effective = dict(self.configured)
        self._learned_at = {}
        if learned:
            for bucket, at in old._learned_at.items():
                self._adopt(bucket, old.effective[bucket], at)

    def learned(self) -> Learned:
        """What has been learned and not recovered yet, as it is stored."""
        return {bucket: {"limit": limit, "at": at} for bucket, at in self._learned_at.items()
                if (limit := self.effective[bucket]) is not None}

    def current(self, now: float) -> dict[str, int | None]:
        """The effective limits at ``now`` (what was learned, recovered as far as time allows)."""
        if self._learned_at:
            self._recover(now)
        return dict(self.effective)

    # --- the hot path ----------------------------------------------------------------------------

    def has_room(self, in_flight: int) -> bool:
        limit = self.effective["concurrency"]
        return limit is None or in_flight < limit

    def fits(self, now: float, cost: int) -> bool:
        if self._learned_at:
            self._recover(now)
        effective = self.effective
        rpm, tpm, tpd = effective["rpm"], effective["tpm"], effective["tpd"]
        if rpm is not None and self.rpm.used(now) + 1 > rpm:
            return False
        if tpm is not None and self.tpm.used(now) + min(cost, tpm) > tpm:
            return False
        return tpd is None or self.day.current(now) + min(cost, tpd) <= tpd

    # --- batch work: the same limits, less the share kept for interactive requests ----------------

    def has_room_batch(self, in_flight: int, keep: float) -> bool:
        limit = self.effective["concurrency"]
        return limit is None or in_flight < batch_limit(limit, keep)

    def fits_batch(self, now: float, cost: int, keep: float) -> bool:
        if self._learned_at:
            self._recover(now)
        effective = self.effective
        rpm, tpm, tpd = effective["rpm"], effective["tpm"], effective["tpd"]
        if rpm is not None and self.rpm.used(now) + 1 > batch_limit(rpm, keep):
            return False
        if tpm is not None:
            limit = batch_limit(tpm, keep)
            if self.tpm.used(now) + min(cost, limit) > limit:
                return False
        if tpd is not None:
            limit = batch_limit(tpd, keep)
            return self.day.current(now) + min(cost, limit) <= limit
        return True

    def charge(self, now: float, cost: int) -> Charge:
        rpm = self.rpm.add(now, 1)
        tpm = self.tpm.add(now, cost)
        self.day.add(now, cost)
        return Charge(now, cost, rpm, tpm)

    def settle(self, charge: Charge, actual: int | None, now: float) -> None:
        """True the charge up with the tokens really used (None: keep the up-front estimate)."""
        if actual is None or actual == charge.cost:
            return
        if charge.tpm is not None:
            self.tpm.adjust(charge.tpm, actual - charge.cost, now)
        self.day.adjust(charge.at, actual - charge.cost, now)

    def free_at(self, now: float, cost: int, keep: float | None = None) -> float:
        """When the time-based windows let a request of ``cost`` through (concurrency aside); with
        ``keep``, a batch request, which may use only that fraction of each window."""
        effective = self.effective
        rpm, tpm, tpd = effective["rpm"], effective["tpm"], effective["tpd"]
        if keep is not None:
            rpm, tpm, tpd = (None if limit is None else batch_limit(limit, keep) for limit in (rpm, tpm, tpd))
        at = now
        if rpm is not None:
            at = max(at, self.rpm.free_at(now, 1, rpm))
        if tpm is not None:
            at = max(at, self.tpm.free_at(now, cost, tpm))
        if tpd is not None:
            at = max(at, self.day.free_at(now, cost, tpd))
        return at

    # --- learning ------------------------------------------------------------------------------

    def learn(self, bucket: str | None, limit: int | None, in_flight: int, now: float) -> bool:
        """The upstream refused a request for ``bucket``; lower that window to what it allowed. Returns
        whether something was learned."""
        if bucket not in BUCKETS:
            return False
        if limit is None:
            if bucket == "concurrency":
                limit = in_flight - 1  # the others in flight were allowed; this one was not
            elif bucket == "rpm":
                limit = int(self.rpm.used(now)) - 1
            elif bucket == "tpm":
                limit = int(self.tpm.used(now) * 0.9)
            else:
                return False
        limit = max(1, limit)
        current = self.effective[bucket]
        if current is None or limit < current:
            self.effective[bucket] = limit
        self._learned_at[bucket] = now
        return True

    def _recover(self, now: float) -> None:
        for bucket, at in list(self._learned_at.items()):
            if now - at < RECOVER_AFTER:
                continue
            learned = self.effective[bucket]
            assert learned is not None
            configured = self.configured[bucket]
            now_at = recovered(learned, at, now, configured)
            if now_at is None:
                self.effective[bucket] = configured
                del self._learned_at[bucket]
            else:
                self.effective[bucket], self._learned_at[bucket] = now_at

    def snapshot(self, now: float, in_flight: int) -> dict[str, object]:
        return {
            "limits": dict(self.effective),
            "configured": dict(self.configured),
            "in_flight": in_flight,
            "rpm_used": int(self.rpm.used(now)),
            "tpm_used": int(self.tpm.used(now)),
            "tpd_used": int(self.day.current(now)),
        }
