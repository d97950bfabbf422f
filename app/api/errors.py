"""The boundary: every error leaves as an OpenAI error object with its status and headers.

``RequestIdMiddleware`` gives each request an ``x-request-id`` and turns anything unexpected into
a JSON 500 that names that id instead of a traceback.
"""

from __future__ import annotations

import logging
import re
import secrets

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import KimiPoolError, MethodNotAllowed, NotFound

log = logging.getLogger("kimi_pool.api")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def error_response(error: KimiPoolError) -> Response:
    return Response(orjson.dumps(error.body()), status_code=error.status, headers=error.headers(),
                    media_type="application/json")


async def handle_kimi_pool_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KimiPoolError)
    return error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"Unknown path: {request.method} {request.url.path}"))
    if exc.status_code == 405:
        allow = [m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()]
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.",
                                               allow=allow))
    error = KimiPoolError(str(exc.detail))
    error.status = exc.status_code
    error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(error)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _CLIENT_ID.match(candidate) else None
                break
        if request_id is None:
            request_id = "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if started:
                raise
            error = KimiPoolError(f"Internal error; quote request id {request_id} when reporting it.")
            response = error_response(error)
            await response(scope, receive, send_with_id)
