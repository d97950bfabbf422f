"""``create_app``: the ASGI application. Nothing is built at import time; the lifespan builds and
closes everything (database, write-behind queue, pool, upstream session, sync loop, metrics, the
batch runner)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from app.account_log import AccountLog
from app.accounts_config import load_accounts_toml
from app.api.admin import Admin, admin_routes
from app.api.admin.dashboard import Dashboard
from app.api.anthropic.count_tokens import count_tokens
from app.api.anthropic.messages import Messages
from app.api.anthropic.models import by_protocol
from app.api.anthropic.models import get_model as anthropic_model
from app.api.anthropic.models import list_models as anthropic_models
from app.api.auth import Authenticator
from app.api.errors import RequestIdMiddleware, handle_http_exception, handle_kimi_pool_error
from app.api.exchange import EXPOSED_HEADERS
from app.api.front import HOT_PATHS, FrontDoor, HotRoute
from app.api.health import healthz, readyz, root
from app.api.ids import Ids
from app.api.metrics import metrics
from app.api.openai.batches import batch_routes
from app.api.openai.chat import ChatCompletions
from app.api.openai.files import file_routes
from app.api.openai.models import get_model, list_models
from app.api.pool_status import pool_status
from app.api.state import Gateway
from app.batch.expiry import FileSweeper
from app.batch.runner import BatchRunner
from app.batch.service import BatchService
from app.clock import Clock, SystemClock
from app.config import Settings
from app.discovery import STARTUP_WAIT, ModelDiscovery
from app.dispatch import Dispatcher
from app.errors import KimiPoolError
from app.idempotency import Idempotency
from app.logs import AccessLog
from app.metrics import Metrics
from app.notify import ReloadSocket
from app.pool.admission import Admission
from app.pool.leases import PoolLeases
from app.pool.scheduler import Pool
from app.pool.sessions import SessionTable
from app.sealing import KEY_NAME, Sealer
from app.shutdown import Shutdown
from app.startup import log_summary
from app.store.db import Database
from app.store.repository import import_config
from app.store.secrets import server_secret
from app.store.sessions import SessionRepository
from app.store.states import StateWriter
from app.store.writer import WriteBehind
from app.sync import AccountSync
from app.upstreams.http import create_session
from app.upstreams.registry import Registry

if TYPE_CHECKING:
    from app.workers.supervisor import Workers

log = logging.getLogger("kimi_pool")


async def import_accounts(db: Database, settings: Settings, clock: Clock) -> None:
    assert settings.accounts_file is not None
    config = load_accounts_toml(settings.accounts_file)
    async with db.session() as session, session.begin():
        await import_config(session, config, clock.time())
    await db.scrub()  # an account's key may have been replaced
    log.info("imported %d account(s) and %d alias(es) from %s", len(config.accounts), len(config.aliases),
             settings.accounts_file)


def create_app(settings: Settings, *, clock: Clock | None = None,
               transport: aiohttp.BaseConnector | None = None, workers: Workers | None = None,
               shutdown: Shutdown | None = None) -> FrontDoor:
    """The gateway. With ``workers`` this process is the keeper of ``serve --workers N``: it starts
    them once everything is up, leases them accounts from its pool, and stops them first at shutdown.
    ``shutdown`` is shared with the server, which tells it when the shutdown's grace period is over."""
    clock = clock or SystemClock()
    shutdown = shutdown or Shutdown()
    ids = Ids()
    auth = Authenticator(settings.master_key)  # the store sync gives it the client keys

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = Database(settings.db_url)
        await db.upgrade()
        if settings.accounts_file is not None:
            await import_accounts(db, settings, clock)
        writer = WriteBehind(db, clock=clock, interval=settings.flush_interval)
        writer.start()
        app.state.sealer = sealer = Sealer(await server_secret(db, KEY_NAME, Sealer.new_key(), clock.time()))
        pool = Pool(clock, interactive_share=settings.interactive_share)
        states = StateWriter(db, pool, clock)
        states.start()
        pool.on_state_change(states.changed)
        pool.on_state_change(AccountLog(clock))
        pool.on_learn(lambda account: writer.put_limits(account.name, account.limits_rev, account.limits.learned()))
        session = create_session(settings, connector=transport)
        registry = Registry.default(session, clock)
        sync = AccountSync(db, pool, auth, clock, unsaved=states.unsaved)
        await sync.load()
        discovery = ModelDiscovery(db, registry, clock, interval=settings.models_refresh, writer=writer, sync=sync)
        discovery_task = asyncio.create_task(discovery.run()) if settings.models_refresh > 0 else None
        if discovery_task is not None:  # serve what the upstreams say from the first request, unless they dawdle
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(discovery.wait_runs(1), STARTUP_WAIT)
        admission = Admission(pool, clock, max_queue=settings.max_queue, max_queue_per_key=settings.max_queue_per_key)
        sessions = SessionTable(ttl=settings.session_ttl, max_per_client=settings.max_sessions_per_key)
        log_summary(settings, db.where, pool, auth)
        async with db.session() as db_session:
            sessions.load(await SessionRepository(db_session).load_active(clock.time()))
        sessions.on_change(writer.put_session)
        observer, metrics_registry = Metrics.registry(pool, admission, clock)
        leases = PoolLeases(pool, admission, sessions, clock, saved=states.saved)
        access_log = AccessLog()
        dispatcher = Dispatcher(leases, registry, writer, clock,
                                failover_deadline=settings.failover_deadline,
                                default_max_tokens=settings.default_max_tokens,
                                observers=(observer, access_log), shutdown=shutdown)
        app.state.gateway = gateway = Gateway(settings, clock, auth, pool, admission, sessions, dispatcher,
                                              clock.time(), metrics_registry)
        idempotency = Idempotency(db, writer, clock, ttl=settings.idempotency_ttl)
        app.state.chat = ChatCompletions(settings, clock, auth, dispatcher, ids, idempotency, shutdown)
        app.state.anthropic = Messages(settings, clock, auth, dispatcher, ids, sealer, shutdown)
        app.state.idempotency = idempotency
        app.state.writer = writer
        app.state.sync = sync

        async def reload() -> None:
            """Bring the pool, the client keys and every worker in line with the database, now."""
            await sync.load()
            if workers is not None:
                await workers.caught_up()

        app.state.admin = Admin(gateway, db, registry, writer, states, reload, discovery)
        app.state.discovery = discovery
        runner = BatchRunner(db, dispatcher, clock, models=pool.models, concurrency=settings.batch_concurrency,
                             max_wait=settings.batch_max_wait, max_attempts=settings.batch_max_attempts)
        app.state.batch_runner = runner
        app.state.workers = workers
        sweeper = FileSweeper(db, clock)
        app.state.file_sweeper = sweeper
        app.state.batches = BatchService(
            db, clock, max_file_bytes=settings.max_file_bytes, max_files=settings.max_files_per_key,
            max_bytes=settings.max_file_bytes_per_key, on_change=runner.notify, on_expiry=sweeper.expiring)
        sync_task = asyncio.create_task(sync.run(settings.sync_interval))
        runner.start()  # batches left active by an earlier run resume
        sweeper.start()
        if workers is not None:
            await workers.start(leases, writer, observer, sync)
        notices = ReloadSocket(reload)
        if await notices.start(settings.db_url) is not None:
            log.info("changes made with the CLI reach this server at once (%s)", notices.path)
        gc.collect()
        gc.freeze()  # what startup built lives for good: keep it out of every later collection
        try:
            yield
        finally:
            await notices.close()
            if workers is not None:
                await workers.stop()  # they finish their requests while the pool and the store are up
            for task in (sync_task, discovery_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await runner.close()
            await sweeper.close()
            await admission.close()
            await registry.close()
            await session.close()
            await states.close()
            await writer.close()
            await db.dispose()
            access_log.flush()

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/v1/models", by_protocol(anthropic_models, list_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", by_protocol(anthropic_model, get_model), methods=["GET"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/v1/pool/status", pool_status, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *(Route(path, HotRoute(name), methods=["POST"]) for path, name in HOT_PATHS.items()),
        *file_routes(),
        *batch_routes(),
        *Dashboard().routes(),  # before the admin API's routes: it serves /admin/usage/series
        admin_routes(),
    ]
    middleware = [
        Middleware(RequestIdMiddleware, ids=ids),
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=list(EXPOSED_HEADERS),
            max_age=600,
        ),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={KimiPoolError: handle_kimi_pool_error, HTTPException: handle_http_exception},
        lifespan=lifespan,
    )
    return FrontDoor(app, auth, ids, shutdown)
