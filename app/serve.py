"""Running servers from the command line: the gateway and the emulators, under uvicorn.

Kept apart from ``cli.py`` so the commands stay thin and their option parsing stays there.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys

import uvicorn
from starlette.types import ASGIApp

from app.config import Settings, load_accounts_toml
from app.errors import ConfigError
from app.main import create_app


def _run(app: ASGIApp, host: str, port: int, log_level: str) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # one line per request comes from kimi-pool itself, without credentials
        lifespan="on",
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=30,
        server_header=False,
    )
    uvicorn.Server(config).run()


def migrate_in_child(db_url: str) -> None:
    """Bring the schema to head in a short-lived child process, so alembic (~11 MB) never loads into
    the long-running server; the server's own check then finds the schema current."""
    done = subprocess.run([sys.executable, "-m", "app", "--db", db_url, "db", "upgrade"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "db upgrade failed"
        raise ConfigError(message.removeprefix("kimi-pool: error: "))


def serve_gateway(settings: Settings) -> None:
    if settings.accounts_file is not None:
        load_accounts_toml(settings.accounts_file)  # a broken file fails here, in one line, before binding
    migrate_in_child(settings.db_url)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn handles SIGTERM (stop accepting, let in-flight requests and streams finish, then the
    # lifespan flushes usage and state) and afterwards re-raises the signal to the handler it found:
    # make that handler a no-op, so a clean shutdown ends with exit status 0, not "killed by SIGTERM".
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    _run(create_app(settings), settings.host, settings.port, settings.log_level)


def serve_emulator(app: ASGIApp, host: str, port: int, log_level: str = "warning") -> None:
    _run(app, host, port, log_level)
