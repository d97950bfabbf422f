"""What every front-end's hot-path handler shares (the OpenAI chat completions, and any protocol added
beside it): the request id and CORS headers of its answers, the wait a client may ask for, JSON answers,
and watching for the client leaving while its request waits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send

from app.api.errors import header
from app.errors import InvalidRequest, KimiPoolError

Headers = list[tuple[bytes, bytes]]
JSON = (b"content-type", b"application/json")
EXPOSED_HEADERS = ("x-request-id", "retry-after", "x-kimi-pool-account", "idempotent-replayed")


class CommonHeaders:
    """The headers every answer carries: its request id and, for a browser, CORS (the Starlette routes get
    the same from the middleware)."""

    def __init__(self, origins: tuple[str, ...], exposed: tuple[str, ...] = EXPOSED_HEADERS) -> None:
        self._any_origin = "*" in origins
        self._origins = frozenset(o.encode() for o in origins)
        self._exposed = ", ".join(exposed).encode()

    def __call__(self, scope: Scope, request_id: str) -> Headers:
        headers = [(b"x-request-id", request_id.encode())]
        origin = header(scope, b"origin")
        if origin is not None:
            if self._any_origin:
                headers.append((b"access-control-allow-origin", b"*"))
            elif origin in self._origins:
                headers += [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
            headers.append((b"access-control-expose-headers", self._exposed))
        return headers


def max_wait(scope: Scope, ceiling: float) -> float:
    """How long the request may wait for an account: ``X-Kimi-Pool-Max-Wait`` if asked, within ``ceiling``."""
    asked = header(scope, b"x-kimi-pool-max-wait")
    if asked is None:
        return ceiling
    try:
        seconds = float(asked)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also catches nan
        raise InvalidRequest("X-Kimi-Pool-Max-Wait must be a number of seconds, 0 or more.",
                             param="X-Kimi-Pool-Max-Wait")
    return min(seconds, ceiling)


def error_headers(error: KimiPoolError) -> Headers:
    return [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]


async def send_json(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, JSON, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def disconnect_of(receive: Receive) -> Callable[[], Awaitable[None]]:
    """What returns when the client has closed its connection (the body has been read: the next
    message is the disconnect)."""

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return gone
