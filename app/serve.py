"""Running servers from the command line: the gateway and the emulators, under uvicorn.

Kept apart from ``cli.py`` so the commands stay thin and their option parsing stays there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import uvicorn
from starlette.types import ASGIApp
from uvicorn.config import LOGGING_CONFIG

from app.accounts_config import load_accounts_toml
from app.config import Settings
from app.errors import ConfigError
from app.log_buffer import BufferedHandler, TextFormatter
from app.logs import JsonFormatter
from app.main import create_app
from app.netguard import NetLimits, connection_cap, http_protocol, raise_open_files_limit
from app.shutdown import Shutdown

if TYPE_CHECKING:
    from app.workers.supervisor import Workers

log = logging.getLogger("kimi_pool")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("aiosqlite",)
"""Libraries kept at INFO even with ``--log-level debug``: aiosqlite logs every statement with its
bound values at DEBUG, account secrets included."""


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Send every log record (kimi-pool's, uvicorn's, the libraries') to ``stream`` (stderr) through one
    handler on the root logger: ``text`` lines, or one JSON object per line. Requests' lines are written
    in batches (``app.log_buffer``)."""
    handler = BufferedHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))


SETTLE = 5.0
"""Seconds the requests cut at the end of the shutdown grace period get to send their error and be
recorded, before uvicorn cancels whatever is left for good."""


def server_config(app: ASGIApp, log_level: str, log_config: dict[str, Any] | None = LOGGING_CONFIG,
                  grace: float = 30.0, http: type[asyncio.Protocol] | str = "httptools",
                  **where: Any) -> uvicorn.Config:
    """uvicorn's settings for every server kimi-pool runs; ``http`` is the protocol (``app.netguard``'s,
    or plain httptools for the keeper's private socket)."""
    return uvicorn.Config(
        app,
        **where,
        log_level=log_level,
        log_config=log_config,
        access_log=False,  # one line per request comes from kimi-pool itself, without credentials
        lifespan="on",
        loop="uvloop",
        http=http,
        timeout_graceful_shutdown=int(grace + SETTLE),  # a backstop: ``Server`` ends the grace period itself
        server_header=False,
    )


def net_limits(settings: Settings) -> NetLimits:
    return NetLimits(max_header_bytes=settings.max_header_bytes, header_timeout=settings.header_timeout,
                     max_connections=settings.max_connections)


class Server(uvicorn.Server):
    """uvicorn's server, ending the shutdown's grace period itself: after SIGTERM, requests and streams in
    flight may finish for ``grace`` seconds; then ``shutdown`` is told, so that each request still running
    answers 503 ``shutting_down`` (or ends its stream with that error event) and is recorded as such, and
    they are cancelled. With ``workers`` (the keeper of ``serve --workers N``) a stop signal reaches the
    workers at once, so they stop accepting too."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown, grace: float,
                 workers: Workers | None = None) -> None:
        super().__init__(config)
        self._ending = shutdown
        self._grace = grace
        self._workers = workers
        self.stopped_by: int | None = None
        """The signal that stopped the server (the first one, if several came)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        if self._workers is not None:
            self._workers.signal_stop()
        super().handle_exit(sig, frame)

    def said_stopped(self) -> None:
        """The last line of a clean stop, naming the signal that asked for it."""
        if self.stopped_by is not None:
            log.info("kimi-pool stopped on %s; exit status 0",
                     "Ctrl-C (SIGINT)" if self.stopped_by == signal.SIGINT else signal.Signals(self.stopped_by).name)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self._grace, self._end_grace)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_grace(self) -> None:
        tasks = list(self.server_state.tasks)
        if not tasks:
            return
        log.warning("the shutdown grace period is over: ending %d request(s) still running", len(tasks))
        self._ending.end_grace()
        for task in tasks:
            task.cancel()


def migrate_in_child(db_url: str) -> None:
    """Bring the schema to head in a short-lived child process, so alembic (~11 MB) never loads into
    the long-running server; the server's own check then finds the schema current."""
    done = subprocess.run([sys.executable, "-m", "app", "--db", db_url, "db", "upgrade"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "db upgrade failed"
        raise ConfigError(message.removeprefix("kimi-pool: error: "))


SETTINGS_ENV = "KIMI_POOL_SERVE_SETTINGS"
"""How ``serve`` hands its options to the server process it becomes (never the master key: that one
is read from the environment again, where it came from)."""


def serve_gateway(settings: Settings, options: dict[str, Any]) -> None:
    """Check the accounts file and migrate in the command line's process, then become the server:
    exec a fresh interpreter (same pid) running ``main``, so the long-running server never loads the
    CLI's libraries (typer, rich, pydantic: ~11 MB). ``options`` are the ``Settings`` the command set."""
    if settings.accounts_file is not None:
        load_accounts_toml(settings.accounts_file)  # a broken file fails here, in one line, before binding
    migrate_in_child(settings.db_url)
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, SETTINGS_ENV: json.dumps(options, default=str)}
    # the arguments after -c are for ps and top only: the server reads its settings from the environment
    os.execve(sys.executable, [sys.executable, "-c", "from app.serve import main; main()", *sys.argv[1:]], env)


def quiet_stop_signals() -> None:
    """uvicorn handles SIGTERM and SIGINT (stop accepting, let in-flight requests and streams finish,
    then the lifespan flushes usage and state) and afterwards re-raises the signal to the handler it
    found: make that handler a no-op, so a clean stop ends with exit status 0 and no
    ``KeyboardInterrupt`` traceback, rather than "killed by SIGTERM" or 130. (The handler is not
    Python's default for SIGINT, so ``asyncio.run`` does not put its own in, which would raise
    ``KeyboardInterrupt`` after uvicorn's clean stop.)"""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: None)


def set_title(title: str) -> None:
    """What ``ps``, ``top`` and ``/proc/PID/cmdline`` show for this process (instead of ``python -c …``)."""
    from setproctitle import setproctitle

    setproctitle(title)


def main() -> None:
    """The server process ``serve`` becomes. A setting it cannot use (a port taken) ends it with one line."""
    quiet_stop_signals()
    options = json.loads(os.environ.pop(SETTINGS_ENV, "{}"))
    if options.get("accounts_file") is not None:
        options["accounts_file"] = Path(options["accounts_file"])
    set_title(f"kimi-pool serve {options.get('host', '127.0.0.1')}:{options.get('port', 8088)}")
    try:
        run_server(Settings.from_env(**options))
    except ConfigError as error:
        print(f"kimi-pool: error: {error.message}", file=sys.stderr)
        raise SystemExit(1) from None


def run_server(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    quiet_stop_signals()
    open_files = raise_open_files_limit()  # the workers inherit it
    cap = connection_cap(settings.max_connections, open_files)
    if cap < settings.max_connections:
        log.warning("max connections lowered from %d to %d: the open-files limit is %d (ulimit -n)",
                    settings.max_connections, cap, open_files)
        settings = settings.with_(max_connections=cap)
    if settings.workers > 1:
        _serve_with_workers(settings)
        return
    shutdown = Shutdown()
    # log_config=None: uvicorn's own records go to the root handler too, in the same format
    config = server_config(create_app(settings, shutdown=shutdown), settings.log_level, None, settings.shutdown_grace,
                           http_protocol(net_limits(settings)), host=settings.host, port=settings.port)
    server = Server(config, shutdown, settings.shutdown_grace)
    server.run()
    server.said_stopped()


def _serve_with_workers(settings: Settings) -> None:
    """``serve --workers N``: this process keeps the pool, the store, the batch runner and every route
    but plain chat completions (on a private Unix socket); N worker processes serve the address."""
    from app.clock import SystemClock
    from app.workers.supervisor import Workers, listen
    from app.workers.worker import HTTP_SOCKET

    sockets = listen(settings.host, settings.port, settings.workers)
    runtime = tempfile.mkdtemp(prefix="kimi-pool-")
    try:
        clock = SystemClock()
        workers = Workers(settings, runtime, sockets, clock)
        shutdown = Shutdown()
        app = create_app(settings, clock=clock, workers=workers, shutdown=shutdown)
        # the keeper's socket is private (only its workers connect, with heads they have checked): plain httptools
        config = server_config(app, settings.log_level, None, settings.shutdown_grace,
                               uds=os.path.join(runtime, HTTP_SOCKET))
        server = Server(config, shutdown, settings.shutdown_grace, workers)
        server.run()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    server.said_stopped()


def serve_emulator(app: ASGIApp, host: str, port: int, log_level: str = "warning") -> None:
    raise_open_files_limit()
    uvicorn.Server(server_config(app, log_level, http=http_protocol(NetLimits()), host=host, port=port)).run()
