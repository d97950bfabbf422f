"""``GET /metrics``: the Prometheus text format of the app's own registry (``app/metrics.py``).

Like an admin route, it needs the master key when one is set."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from app.api.state import Gateway


async def metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    gateway.auth.require_admin(request.headers)
    return Response(generate_latest(gateway.metrics), headers={"Content-Type": CONTENT_TYPE_LATEST})
