"""kimi-pool's errors in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}, "request_id"}``
with Anthropic's statuses, so the SDK's typed exceptions and Claude Code's retries work.

The one exception tree (``app.errors``) is mapped here, by class first and then by status:

* 429 ``rate_limit_error`` + ``retry-after``: every account that could serve is at a rate limit (its
  own limits, or a cooldown after the upstream's 429) until the pool's next free time;
* 529 ``overloaded_error`` + ``retry-after``: the pool is saturated or cannot serve now — the admission
  queue is full, Kimi says its engine is overloaded, no account can serve (all dead, disabled, out of
  quota, or every one failed), or the server is shutting down;
* 400 ``invalid_request_error``, 401 ``authentication_error``, 403 ``permission_error``, 404
  ``not_found_error``, 413 ``request_too_large``, 500 ``api_error`` (anything else, upstream failures
  included).

Claude Code retries 429, 529 and 500 before a stream begins (honouring ``retry-after``); after it, the
stream ends with ``event: error`` carrying the same body (``error_frame``).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from app.errors import (
    KimiPoolError,
    PoolBusy,
    PoolUnavailable,
    QueueFull,
    ShuttingDown,
    UpstreamOverloaded,
)
from app.redact import redact

_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
    529: "overloaded_error",
}
_OVERLOADED = (QueueFull, PoolUnavailable, UpstreamOverloaded, ShuttingDown)
OVERLOADED = 529
PARAMS = {"reasoning_effort": "thinking", "response_format": "output_config.format", "stop": "stop_sequences",
          "max_completion_tokens": "max_tokens"}
"""OpenAI parameter names (as the shared checks name them) → the Messages API's."""


def status_and_type(error: KimiPoolError) -> tuple[int, str]:
    """The Anthropic status and error type of ``error``."""
    if isinstance(error, _OVERLOADED):
        return OVERLOADED, "overloaded_error"
    if isinstance(error, PoolBusy):
        return 429, "rate_limit_error"
    status = error.status
    kind = _BY_STATUS.get(status)
    if kind is not None:
        return status, kind
    if 400 <= status < 500:
        return status, "invalid_request_error"
    return 500, "api_error"


def _message(error: KimiPoolError) -> str:
    message = redact(error.message)
    param = PARAMS.get(error.param or "", error.param)
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return message


def error_body(error: KimiPoolError, request_id: str | None) -> dict[str, Any]:
    _, kind = status_and_type(error)
    return {"type": "error", "error": {"type": kind, "message": _message(error)}, "request_id": request_id}


def error_headers(error: KimiPoolError) -> list[tuple[bytes, bytes]]:
    """``retry-after`` where the error has a wait (``allow`` for a 405)."""
    return [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]


def error_json(error: KimiPoolError, request_id: str | None) -> tuple[int, bytes]:
    status, _ = status_and_type(error)
    return status, orjson.dumps(error_body(error, request_id))


def error_frame(error: KimiPoolError, request_id: str | None = None) -> bytes:
    """The ``event: error`` that ends a stream which has begun."""
    return b"event: error\ndata: " + orjson.dumps(error_body(error, request_id)) + b"\n\n"


def error_response(error: KimiPoolError, request_id: str | None) -> Response:
    """The error as a Starlette response (the routes beside the hot path)."""
    status, body = error_json(error, request_id)
    headers = error.headers()
    if request_id:
        headers["request-id"] = request_id
    return Response(body, status_code=status, headers=headers, media_type="application/json")
