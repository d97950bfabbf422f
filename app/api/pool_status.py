"""``GET /v1/pool/status``: how the pool stands.

A client key sees what it needs to pace itself: the admission queue's depth and, per model, how many
accounts could take a request now and how long until one could. The master key (and anyone on an
open gateway, which answers on loopback only) also sees every account: its name, state, reason,
in-flight count, window use and cooldown end, and the queue per client key.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.api.state import Gateway
from app.redact import redact_optional


def summary(gateway: Gateway) -> dict[str, Any]:
    """What any client key may see: no account names, no organisations, no other clients."""
    pool = gateway.pool
    models = {model: {"ready": pool.ready(model), "next_free_in": pool.next_free_in(model)}
              for model in sorted(pool.models())}
    return {"now": gateway.clock.time(), "queue": {"depth": gateway.admission.depth}, "models": models}


def status(gateway: Gateway) -> dict[str, Any]:
    """The operator's view: the summary, every account, the queue per client."""
    pool, now = gateway.pool, gateway.clock.time()
    pool.refresh_states()
    accounts = []
    for account in pool.accounts.values():
        accounts.append({
            "name": account.name,
            "kind": account.kind,
            "state": account.state.value,
            "until": account.until,
            "reason": redact_optional(account.reason),
            "weight": account.weight,
            "models": sorted(account.models),
            **account.limits.snapshot(now, account.in_flight),
        })
    view = summary(gateway)
    view["accounts"] = accounts
    view["queue"].update(by_client=gateway.admission.depth_by_client(), waited_total=gateway.admission.waited)
    view["next_free_in"] = {model: ready["next_free_in"] for model, ready in view["models"].items()}
    return view


async def pool_status(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    gateway.auth.authenticate(request.headers)
    view = status(gateway) if gateway.auth.is_master(request.headers) else summary(gateway)
    return Response(orjson.dumps(view), media_type="application/json")
