"""The boundary: every error leaves as an OpenAI error object with its status and headers — or, for a
request of the Anthropic Messages API (a ``/v1/messages…`` path, or an ``anthropic-version`` header), as
Anthropic's error body (``app.api.anthropic.errors``).

``RequestIdMiddleware`` gives each request an ``x-request-id`` and turns anything unexpected into
a JSON 500 that names that id instead of a traceback.
"""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.anthropic.errors import error_response as anthropic_error
from app.api.ids import Ids
from app.errors import KimiPoolError, MethodNotAllowed, NotFound

log = logging.getLogger("kimi_pool.api")
ANTHROPIC_PATHS = "/v1/messages"


def error_response(error: KimiPoolError, scope: Scope | None = None) -> Response:
    """``error`` as the protocol of the request in ``scope`` renders it (OpenAI's without a scope)."""
    if scope is not None and (scope["path"].startswith(ANTHROPIC_PATHS)
                              or header(scope, b"anthropic-version") is not None):
        return anthropic_error(error, scope.get("state", {}).get("request_id"))
    return Response(orjson.dumps(error.body()), status_code=error.status, headers=error.headers(),
                    media_type="application/json")


def internal_error(request_id: str) -> KimiPoolError:
    return KimiPoolError(f"Internal error; quote request id {request_id} when reporting it.")


async def handle_kimi_pool_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KimiPoolError)
    return error_response(exc, request.scope)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"Unknown path: {request.method} {request.url.path}"), request.scope)
    if exc.status_code == 405:
        allow = [m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()]
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.",
                                               allow=allow), request.scope)
    error = KimiPoolError(str(exc.detail))
    error.status = exc.status_code
    error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(error, request.scope)


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp, ids: Ids) -> None:
        self.app = app
        self.ids = ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self.ids.request_id(header(scope, b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        extra = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if started:
                raise
            await error_response(internal_error(request_id), scope)(scope, receive, send_with_id)
