"""A worker passes every request but the plain chat completion to the keeper, over the keeper's HTTP
Unix socket: the admin API, dashboard, metrics, files, batches, models, status, and chat requests
that carry an ``Idempotency-Key`` (whose answers must be claimed in one place). Bodies stream both
ways, so a 100 MiB batch upload or a long stream costs no more memory than in the keeper itself."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import orjson
from multidict import CIMultiDict
from starlette.types import Receive, Scope, Send

log = logging.getLogger("kimi_pool.workers")

_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection"})
_DROP_BACK = _HOP | {b"date", b"server"}


class Forwarder:
    def __init__(self, socket_path: str) -> None:
        self._path = socket_path
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self._path, limit=0),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._session is not None
        headers: CIMultiDict[str] = CIMultiDict()
        has_body = False
        for name, value in scope["headers"]:
            if name in _HOP:
                if name == b"transfer-encoding":
                    has_body = True
                continue
            if name == b"content-length":
                has_body = value != b"0"
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        url = "http://keeper" + path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        started = False
        try:
            async with self._session.request(scope["method"], url, headers=headers,
                                             data=_body(receive) if has_body else None,
                                             allow_redirects=False) as response:
                back = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in _DROP_BACK]
                await send({"type": "http.response.start", "status": response.status, "headers": back})
                started = True
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientError, ConnectionError) as exc:
            if started:
                raise
            log.warning("forwarding %s %s to the keeper failed: %s", scope["method"], scope["path"], exc)
            body = orjson.dumps({"error": {"message": "kimi-pool is restarting or shutting down; retry shortly.",
                                           "type": "service_unavailable", "param": None,
                                           "code": "keeper_unavailable"}})
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
