"""The ``x-ratelimit-*`` headers chat responses carry, derived from the pool's RPM windows."""

from __future__ import annotations

from app.pool.scheduler import Pool

HEADROOM_TTL = 1.0
"""Seconds a model's ``x-ratelimit-*`` figures are reused: computing them walks its accounts."""


class Headroom:
    """``x-ratelimit-{limit,remaining,reset}-requests`` for a model, cached for ``HEADROOM_TTL``."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._cache: dict[str, tuple[float, list[tuple[bytes, bytes]]]] = {}

    def headers(self, model: str, now: float) -> list[tuple[bytes, bytes]]:
        cached = self._cache.get(model)
        if cached is not None and now - cached[0] < HEADROOM_TTL:
            return cached[1]
        limit = remaining = 0
        reset = None
        for account in self._pool.serving(model):
            rpm = account.limits.effective["rpm"]
            if rpm is None or not account.could_serve_later():
                continue
            used = int(account.limits.rpm.used(now))
            limit += rpm
            remaining += max(0, rpm - used)
            at = account.limits.rpm.free_at(now, 1, rpm)
            reset = at if reset is None else min(reset, at)
        headers: list[tuple[bytes, bytes]] = []
        if limit:
            wait = max(0.0, (reset or now) - now)
            headers = [(b"x-ratelimit-limit-requests", str(limit).encode()),
                       (b"x-ratelimit-remaining-requests", str(remaining).encode()),
                       (b"x-ratelimit-reset-requests", f"{wait:.0f}s".encode())]
        self._cache[model] = (now, headers)
        return headers
