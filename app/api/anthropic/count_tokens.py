"""``POST /v1/messages/count_tokens`` → ``{"input_tokens": N}``: the same prompt estimate admission charges a
request up front (``app.tokens``), over the same neutral messages ``/v1/messages`` would send. The request is
checked as ``/v1/messages`` checks it (model served, needs some account can meet, thinking signatures)."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.api.anthropic.content import THINKING
from app.api.anthropic.errors import error_response
from app.api.anthropic.models import unknown_model
from app.api.anthropic.schema import parse_messages_request
from app.api.body import read_body
from app.api.openai.schema import parse_json
from app.api.state import Gateway
from app.errors import KimiPoolError, ModelNotFound
from app.sealing import Sealer
from app.tokens import estimate_tokens


async def count_tokens(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    sealer: Sealer = request.app.state.sealer
    try:
        gateway.auth.authenticate(request.headers)
        declared = request.headers.get("content-length")
        raw = await read_body(request.receive, declared.encode() if declared else None,
                              gateway.settings.max_body_bytes)
        parsed = parse_messages_request(parse_json(raw),
                                        lambda text, sig: sealer.verify(THINKING, text.encode(), sig), counting=True)
        try:
            gateway.dispatcher.check(parsed.chat)
        except ModelNotFound:
            raise unknown_model(parsed.chat.model, gateway.dispatcher.leases.models()) from None
    except KimiPoolError as error:
        return error_response(error, request.scope.get("state", {}).get("request_id"))
    body = {"input_tokens": estimate_tokens(parsed.chat.messages)}
    return Response(orjson.dumps(body), media_type="application/json")
