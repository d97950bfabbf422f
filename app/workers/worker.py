"""One worker process of ``serve --workers N``: the hot paths on its own core.

A worker serves the hot paths (``POST /v1/chat/completions``, ``POST /v1/messages``) itself (auth,
parsing, the upstream call, rendering) with accounts leased from the keeper (``RemoteLeases``), and
passes every other request to the keeper (``Forwarder``). It reads its settings as JSON on stdin and
serves the listening socket it inherits as a file descriptor; ``python -m app.workers.worker`` is how
the keeper starts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from app.api.anthropic.messages import Messages
from app.api.auth import Authenticator
from app.api.errors import header
from app.api.front import HOT_PATHS, answer_cut
from app.api.ids import Ids
from app.api.loopback import turned_away
from app.api.openai.chat import ChatCompletions
from app.clock import Clock, SystemClock
from app.config import Settings
from app.dispatch import Dispatcher
from app.logs import AccessLog
from app.pool.scheduler import Pool
from app.sealing import KEY_NAME, Sealer
from app.shutdown import Shutdown
from app.store.db import Database
from app.store.secrets import server_secret
from app.sync import AccountSync
from app.upstreams.http import create_session
from app.upstreams.registry import Registry
from app.workers.client import KeeperLink, NoUsage, RemoteLeases, RemoteObserver, hello
from app.workers.forward import Forwarder

log = logging.getLogger("kimi_pool.workers")

LEASES_SOCKET = "leases.sock"
HTTP_SOCKET = "http.sock"


class WorkerFront:
    """The worker's ASGI app: the hot paths here (chat completions without an ``Idempotency-Key``, Anthropic
    messages), everything else to the keeper.

    A hot-path request whose key this worker does not know goes to the keeper too: the key may have
    been created a moment ago through the admin API (the keeper knows it at once, a worker after
    its next reload), and the keeper answers a bad key with the same 401 as the worker would.
    While the gateway is open, the rules of ``app.api.loopback`` come first, as in ``FrontDoor``."""

    def __init__(self, app: Starlette, auth: Authenticator, ids: Ids, shutdown: Shutdown) -> None:
        self.app = app
        self._auth = auth
        self._ids = ids
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            state = self.app.state
            if self._auth.open and (refused := turned_away(scope, self._ids)) is not None:  # as the keeper would
                await refused(scope, receive, send)
                return
            hot = HOT_PATHS.get(scope["path"]) if scope["method"] == "POST" else None
            handler = getattr(state, hot, None) if hot is not None else None
            if (handler is not None and (hot != "chat" or header(scope, b"idempotency-key") is None)
                    and self._auth.knows(Headers(scope=scope))):
                await handler(scope, receive, send)
            else:
                await answer_cut(state.forward, scope, receive, send, self.shutdown)
            return
        await self.app(scope, receive, send)


def create_worker_app(settings: Settings, *, runtime: str, index: int, clock: Clock | None = None,
                      transport: aiohttp.BaseConnector | None = None, shutdown: Shutdown | None = None) -> WorkerFront:
    """A worker's app, leasing from the keeper whose sockets are in the directory ``runtime``."""
    clock = clock or SystemClock()
    shutdown = shutdown or Shutdown()
    auth = Authenticator(settings.master_key)  # the store sync gives it the client keys
    ids = Ids()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = Database(settings.db_url)
        accounts = Pool(clock)  # this worker's copy of the accounts: never scheduled on
        sync = AccountSync(db, accounts, auth, clock, quiet=True)
        await sync.load()
        link = KeeperLink(on_reload=sync.load, on_lost=_keeper_lost)
        await link.connect(os.path.join(runtime, LEASES_SOCKET))
        session = create_session(settings, connector=transport)
        registry = Registry.default(session, clock)
        access_log = AccessLog(worker=index)
        dispatcher = Dispatcher(RemoteLeases(link, accounts, sync.load), registry, NoUsage(), clock,
                                failover_deadline=settings.failover_deadline,
                                default_max_tokens=settings.default_max_tokens,
                                observers=(access_log, RemoteObserver(link)), shutdown=shutdown)
        forward = Forwarder(os.path.join(runtime, HTTP_SOCKET))
        forward.start()
        app.state.chat = ChatCompletions(settings, clock, auth, dispatcher, ids, None, shutdown)
        sealer = Sealer(await server_secret(db, KEY_NAME, Sealer.new_key(), clock.time()))
        app.state.anthropic = Messages(settings, clock, auth, dispatcher, ids, sealer, shutdown)
        app.state.forward = forward
        gc.collect()
        gc.freeze()
        hello(link, index)
        try:
            yield
        finally:
            await registry.close()
            await session.close()
            await forward.close()
            link.close()  # sends what is queued (the last usage records) first
            await db.dispose()
            access_log.flush()

    return WorkerFront(Starlette(lifespan=lifespan), auth, ids, shutdown)


def _keeper_lost() -> None:
    log.error("the keeper process is gone; this worker stops")
    signal.raise_signal(signal.SIGTERM)


def settings_to_json(settings: Settings) -> dict[str, Any]:
    fields = dataclasses.asdict(settings)
    fields["accounts_file"] = None  # the keeper imports it; workers read the database
    return fields


def settings_from_json(fields: dict[str, Any]) -> Settings:
    fields["cors_origins"] = tuple(fields.get("cors_origins") or ())
    if fields.get("accounts_file") is not None:
        fields["accounts_file"] = Path(fields["accounts_file"])
    return Settings(**fields)


def main() -> None:
    from app.netguard import http_protocol
    from app.serve import Server, configure_logging, net_limits, quiet_stop_signals, server_config, set_title

    quiet_stop_signals()  # exit 0 after uvicorn's clean shutdown
    spec = orjson.loads(sys.stdin.buffer.read())
    set_title(f"kimi-pool worker {spec['index']}")
    settings = settings_from_json(spec["settings"])
    configure_logging(settings.log_level, settings.log_format)
    listener = socket.socket(fileno=int(spec["fd"]))
    shutdown = Shutdown()
    app = create_worker_app(settings, runtime=spec["runtime"], index=int(spec["index"]), shutdown=shutdown)
    config = server_config(app, settings.log_level, None, settings.shutdown_grace, http_protocol(net_limits(settings)))
    Server(config, shutdown, settings.shutdown_grace).run(sockets=[listener])


if __name__ == "__main__":
    main()
