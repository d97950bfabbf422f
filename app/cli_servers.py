"""``kimi-pool serve`` and ``kimi-pool emulate``: the commands that run servers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli_support import cli_state as _state
from app.config import Settings
from app.errors import ConfigError

# --- servers --------------------------------------------------------------------------------------


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs a master key.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8088,
    accounts: Annotated[Path | None, typer.Option(
        metavar="FILE", help="accounts.toml to import (create or update) before serving.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    max_wait: Annotated[float, typer.Option(
        min=0, help="Longest a request waits for an account with room (X-Kimi-Pool-Max-Wait may ask less).")]
    = 30.0,
    max_queue: Annotated[int, typer.Option(min=0, help="Most requests waiting at once; beyond, 429 at once.")]
    = 1000,
) -> None:
    """Serve the OpenAI-compatible gateway. The database is migrated to the current schema first."""
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"bad log level {log_level!r}: use debug, info, warning or error")
    from app.serve import serve_gateway  # the server stack is imported only by the commands that run it

    settings = Settings.from_env(db_url=_state(ctx).db_url, host=host, port=port, accounts_file=accounts,
                                 log_level=log_level, max_wait=max_wait, max_queue=max_queue)
    serve_gateway(settings)


def emulate(
    kind: Annotated[str, typer.Argument(help="Which upstream to emulate: moonshot.", show_default=False)],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 9001,
    keys: Annotated[int, typer.Option(min=1, max=10_000, help="API keys sk-emu-0001…, one organization each.")] = 4,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Concurrent requests per organization.")] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute per organization.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute per organization.")] = None,
    tpd: Annotated[int | None, typer.Option(min=1, help="Tokens per day per organization.")] = None,
    balance: Annotated[float, typer.Option(help="Starting balance of each organization.")] = 100.0,
    first_token_delay: Annotated[float, typer.Option(min=0, help="Seconds before the first token.")] = 0.0,
    chunk_interval: Annotated[float, typer.Option(min=0, help="Seconds between streamed chunks.")] = 0.0,
    reply_words: Annotated[int, typer.Option(min=1, help="Words in each (deterministic) reply.")] = 12,
    usage_position: Annotated[str, typer.Option(help="Where streams carry usage: choice, top or both.")]
    = "choice",
) -> None:
    """Serve a faithful offline stand-in for an upstream (see PROTOCOLS.md), with control routes under /__fake/."""
    from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
    from app.serve import serve_emulator

    if kind != "moonshot":
        raise ConfigError(f"unknown upstream kind {kind!r} to emulate (this build has: moonshot)")
    try:
        config = MoonshotEmulatorConfig.simple(
            keys, concurrency=concurrency, rpm=rpm, tpm=tpm, tpd=tpd, balance=balance,
            first_token_delay=first_token_delay, chunk_interval=chunk_interval, reply_words=reply_words,
            usage_position=usage_position)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"emulating moonshot on http://{host}:{port}/v1 with keys sk-emu-0001…sk-emu-{keys:04d}", file=sys.stderr)
    serve_emulator(create_moonshot_emulator(config), host, port)
