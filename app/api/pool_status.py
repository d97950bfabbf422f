"""``GET /v1/pool/status``: every account's state, in-flight count, window use and cooldown end;
the admission queue; when each model could next take a request. Also the ``x-ratelimit-*``
headers chat responses carry, derived from the same state."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.api.state import Gateway
from app.pool.scheduler import Pool

HEADROOM_TTL = 1.0
"""Seconds a model's ``x-ratelimit-*`` figures are reused: computing them walks its accounts."""


def status(gateway: Gateway) -> dict[str, Any]:
    pool, now = gateway.pool, gateway.clock.time()
    accounts = []
    for account in pool.accounts.values():
        account.refresh(now)
        accounts.append({
            "name": account.name,
            "kind": account.kind,
            "state": account.state.value,
            "until": account.until,
            "reason": account.reason,
            "weight": account.weight,
            "models": sorted(account.models),
            **account.limits.snapshot(now, account.in_flight),
        })
    next_free = {model: pool.next_free_in(model) for model in sorted(pool.models())}
    return {
        "now": now,
        "accounts": accounts,
        "queue": {"depth": gateway.admission.depth, "by_client": gateway.admission.depth_by_client(),
                  "waited_total": gateway.admission.waited},
        "next_free_in": next_free,
    }


async def pool_status(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    gateway.auth.authenticate(request.headers)
    return Response(orjson.dumps(status(gateway)), media_type="application/json")


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
