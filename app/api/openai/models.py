"""``GET /v1/models`` and ``GET /v1/models/{id}``: what the enabled accounts serve."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.api.state import Gateway
from app.pool.census import unserved


def _model(model_id: str, created: int) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "kimi-pool"}


async def list_models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    gateway.auth.authenticate(request.headers)
    created = int(gateway.started_at)
    data = [_model(m, created) for m in sorted(gateway.pool.models())]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


async def get_model(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    gateway.auth.authenticate(request.headers)
    model_id = request.path_params["model_id"]
    if model_id not in gateway.pool.models():
        raise unserved(gateway.pool, model_id)
    return Response(orjson.dumps(_model(model_id, int(gateway.started_at))), media_type="application/json")
