"""``GET /v1/pool/status``: every account's state, in-flight count, window use and cooldown end;
the admission queue; when each model could next take a request."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.api.state import Gateway


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
