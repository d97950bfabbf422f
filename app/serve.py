"""Running servers from the command line: the gateway and the emulators, under uvicorn.

Kept apart from ``cli.py`` so the commands stay thin and their option parsing stays there.
"""

from __future__ import annotations

import logging

import uvicorn
from starlette.types import ASGIApp

from app.config import Settings, load_accounts_toml
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


def serve_gateway(settings: Settings) -> None:
    if settings.accounts_file is not None:
        load_accounts_toml(settings.accounts_file)  # a broken file fails here, in one line, before binding
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _run(create_app(settings), settings.host, settings.port, settings.log_level)


def serve_emulator(app: ASGIApp, host: str, port: int, log_level: str = "warning") -> None:
    _run(app, host, port, log_level)
