"""``GET /healthz`` and ``GET /readyz``: for load balancers, orchestrators and people; no key needed.

``/healthz`` is liveness: the process answers (and how many accounts are in each state). ``/readyz``
is readiness: 200 while some account can serve, 503 with the reason while none can (no account, all
disabled, or every one cooling down, dead or out of quota), with ``Retry-After`` when a cooldown or
timed quota will end. Neither names an account.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.api.state import Gateway
from app.pool.census import by_state, readiness

if TYPE_CHECKING:
    from app.workers.supervisor import Workers


async def healthz(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    body: dict[str, object] = {"status": "ok", "accounts": by_state(gateway.pool)}
    workers: Workers | None = getattr(request.app.state, "workers", None)
    if workers is not None:
        body["workers"] = workers.status
    return Response(orjson.dumps(body), media_type="application/json")


async def readyz(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    ready = readiness(gateway.pool, gateway.clock.time())
    body: dict[str, object] = {"status": "ready" if ready.ready else "unavailable", "accounts": ready.accounts}
    headers = {}
    if not ready.ready:
        body["reason"] = ready.reason
        body["next_ready_in"] = ready.next_ready_in
        if ready.next_ready_in is not None:
            headers["Retry-After"] = str(max(1, math.ceil(ready.next_ready_in)))
    return Response(orjson.dumps(body), status_code=200 if ready.ready else 503, headers=headers,
                    media_type="application/json")


async def root(request: Request) -> Response:
    """What answers at ``/`` (Claude Code preconnects with ``HEAD /``): the service and where its APIs are."""
    body = {"service": "kimi-pool", "openai": "/v1", "anthropic": "/v1/messages", "dashboard": "/dashboard"}
    return Response(orjson.dumps(body), media_type="application/json")
