"""What the account commands ask before they store an account: its upstream, which models it serves
(``app.discovery``), and this shell's environment, whether an ``env:VAR`` secret resolves here (the server
resolves it from its own environment, which may differ)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from app.accounts_config import AccountSpec, resolve_secret
from app.cli.support import cli_state, warn
from app.config import Settings
from app.discovery import Found, discover
from app.errors import ConfigError

NoDiscover = Annotated[bool, typer.Option(
    "--no-discover", help="Do not ask the upstream now which models it serves (the server asks within minutes).")]


def warn_unset(spec: AccountSpec) -> None:
    """Warn when an ``env:VAR`` secret does not resolve here (the server's environment may differ)."""
    if spec.secret is None or not spec.secret.startswith("env:"):
        return
    try:
        resolve_secret(spec.secret)
    except ConfigError as exc:
        warn(f"account {spec.name}: {exc.message} in this shell; the server reads it from its own environment "
             "when it loads the account, and 'accounts list' shows if it could not")


def discover_models(ctx: typer.Context, spec: AccountSpec) -> Found:
    """Ask the account's upstream which models it serves (``app.discovery``); a failure is a warning."""
    from app.upstreams.http import create_session  # the upstream client: only for the commands using it
    from app.upstreams.registry import Registry

    state = cli_state(ctx)
    try:
        resolve_secret(spec.secret)
    except ConfigError:  # warn_unset has said so; the server asks with its own environment
        return Found(spec.name, None)

    async def ask() -> Found:
        async with create_session(Settings.from_env(db_url=state.db_url)) as session:
            registry = Registry.default(session, state.clock)
            try:
                return await discover(registry, spec)
            finally:
                await registry.close()

    found = asyncio.run(ask())
    if found.error is not None:
        warn(f"account {spec.name}: could not ask its upstream which models it serves ({found.error}); it serves "
             "its kind's usual models until the server or 'accounts check' asks again")
    return found


def told(found: Found | None) -> str:
    """``, serves 11 models its upstream lists``: what discovery found, for the command's line."""
    if found is None or found.models is None:
        return ""
    return f", serves the {len(found.models)} model(s) its upstream lists"
