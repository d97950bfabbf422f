"""``GET /v1/models`` and ``GET /v1/models/{id}`` in Anthropic's shape, for a request that carries
``anthropic-version`` (the SDK always sends it; ``by_protocol`` sends other requests to the OpenAI routes);
and the 404 of a model nobody serves, which for a ``claude-*`` name gives the exact command that maps it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.api.anthropic.errors import error_response
from app.api.state import Gateway
from app.errors import InvalidRequest, KimiPoolError, ModelNotFound

Endpoint = Callable[[Request], Awaitable[Response]]
SUGGESTED = ("kimi-k2.6", "kimi-k3", "kimi-k2.7-code", "kimi-k2.5")
"""What a ``claude-*`` name is suggested to map to: the first of these the pool serves."""


def unknown_model(model: str, served: Collection[str]) -> ModelNotFound:
    listing = ", ".join(sorted(served)[:12]) or "none yet"
    if model.startswith("claude-"):
        target = next((name for name in SUGGESTED if name in served), SUGGESTED[0])
        return ModelNotFound(
            f"The model '{model}' is a Claude name that no alias maps to a Kimi model. Map it with: "
            f"kimi-pool models alias {model} --moonshot {target} (or set ANTHROPIC_MODEL to a model this pool "
            f"serves: {listing}).", param="model")
    return ModelNotFound(f"The model '{model}' does not exist or no enabled account serves it (served: {listing}).",
                         param="model")


def by_protocol(anthropic: Endpoint, openai: Endpoint) -> Endpoint:
    """One route for both protocols: Anthropic's answer when the request carries ``anthropic-version``."""

    async def endpoint(request: Request) -> Response:
        if "anthropic-version" in request.headers:
            return await anthropic(request)
        return await openai(request)

    return endpoint


def _model(model_id: str, created: str) -> dict[str, object]:
    return {"type": "model", "id": model_id, "display_name": model_id, "created_at": created, "capabilities": None,
            "max_input_tokens": None, "max_tokens": None}


def _created(gateway: Gateway) -> str:
    return datetime.fromtimestamp(gateway.started_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise InvalidRequest("limit: Input should be a whole number from 1 to 1000.")
    return int(raw)


async def list_models(request: Request) -> Response:
    """Anthropic's page of models: ``limit`` (20 by default), ``after_id`` / ``before_id`` to page."""
    gateway: Gateway = request.app.state.gateway
    try:
        gateway.auth.authenticate(request.headers)
        names = sorted(gateway.pool.models())
        limit = _limit(request)
        after, before = request.query_params.get("after_id"), request.query_params.get("before_id")
        if before:
            end = names.index(before) if before in names else len(names)
            page, more = names[max(0, end - limit):end], end - limit > 0
        else:
            start = names.index(after) + 1 if after in names else 0
            page, more = names[start:start + limit], start + limit < len(names)
    except KimiPoolError as error:
        return error_response(error, request.scope.get("state", {}).get("request_id"))
    created = _created(gateway)
    body = {"data": [_model(name, created) for name in page], "has_more": more,
            "first_id": page[0] if page else None, "last_id": page[-1] if page else None}
    return Response(orjson.dumps(body), media_type="application/json")


async def get_model(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    model_id = request.path_params["model_id"]
    try:
        gateway.auth.authenticate(request.headers)
        served = gateway.pool.models()
        if model_id not in served:
            raise unknown_model(model_id, served)
    except KimiPoolError as error:
        return error_response(error, request.scope.get("state", {}).get("request_id"))
    return Response(orjson.dumps(_model(model_id, _created(gateway))), media_type="application/json")
