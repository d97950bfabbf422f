"""``kimi-pool accounts``: add, list, change and probe the upstream accounts of the pool.

Adding an account (and changing its key, token or base URL) asks its upstream which models it serves
(``app.discovery``). A secret given as ``env:VAR`` is checked against this shell's environment, with a warning
if it is unset there: the server resolves it from its own, and records what it found (``accounts list``).
"""

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts_config import load_accounts_toml, make_account_spec
from app.cli.accounts_edit import accounts_edit, accounts_reset_limits
from app.cli.discovery import NoDiscover, discover_models, told, warn_unset
from app.cli.support import cli_state as _state
from app.cli.support import console as _console
from app.cli.support import ensure_tables, existing_database, naming, tell_running_server
from app.cli.support import human_time as _human_time
from app.cli.support import in_db as _in_db
from app.config import Settings
from app.errors import ConfigError
from app.kimi_auth import TokenInfo, check_fresh
from app.store.db import where_of
from app.store.repository import AccountRepository, import_config
from app.views import OPERATOR_REASON, account_view

accounts_app = typer.Typer(name="accounts", no_args_is_help=True,
                           help="Manage the upstream accounts of the pool.")
accounts_app.command("edit")(accounts_edit)
accounts_app.command("reset-limits")(accounts_reset_limits)


@accounts_app.command("add")
def accounts_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Letters, digits, '.', '_' or '-'.", show_default=False)],
    kind: Annotated[str, typer.Option(help="moonshot, kimi-web or kimi-ai-chat.", show_default=False)],
    api_key: Annotated[str | None, typer.Option(
        metavar="KEY", help="Moonshot API key, or env:VAR (read from the server's environment).")] = None,
    token: Annotated[str | None, typer.Option(
        metavar="JWT", help="kimi-auth token of a kimi.com login (kind kimi-web), or env:VAR.")] = None,
    base_url: Annotated[str | None, typer.Option(metavar="URL", help="Instead of the kind's.")] = None,
    model: Annotated[list[str] | None, typer.Option(
        metavar="ID", help="A model it serves (repeat the option); default: the kind's models.")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    tpd: Annotated[int | None, typer.Option(help="Tokens per day.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight at once.")] = None,
    weight: Annotated[float, typer.Option(help="Share of the traffic, relative to other accounts.")] = 1.0,
    proxy: Annotated[str | None, typer.Option(metavar="URL", help="http(s) proxy for upstream traffic.")] = None,
    max_message_chars: Annotated[int | None, typer.Option(
        min=1, help="kimi-ai-chat: cut the flattened conversation to this length, oldest turns first (1000).")]
    = None,
    keep_chats: Annotated[bool | None, typer.Option(
        "--keep-chats/--delete-chats", help="kimi-web: keep the chats of one-off requests on kimi.com "
        "(default: delete them).", show_default=False)] = None,
    no_discover: NoDiscover = False,
) -> None:
    """Add an account, and ask its upstream which models it serves. Give secrets as env:VAR to keep them out
    of the database and shell history."""
    if api_key is not None and token is not None:
        raise ConfigError("give only one of --api-key and --token")
    options = {k: v for k, v in (("max_message_chars", max_message_chars), ("keep_chats", keep_chats))
               if v is not None}
    spec = make_account_spec(
        name=name, kind=kind, secret=api_key if api_key is not None else token, base_url=base_url,
        models=model or [], rpm=rpm, tpm=tpm, tpd=tpd, concurrency=concurrency, weight=weight,
        proxy=proxy, options=options,
    )
    now = _state(ctx).clock.time()
    expiry = ""
    if spec.kind == "kimi-web" and spec.secret and not spec.secret.startswith("env:"):
        expiry = f", token expires {check_fresh(spec.secret, now, spec.name).describe(now)}"
    warn_unset(spec)
    found = None if no_discover else discover_models(ctx, spec)

    async def add(session: AsyncSession, now: float) -> None:
        repo = AccountRepository(session)
        await repo.add(spec, now)
        if found is not None and found.models is not None:
            await repo.set_models(spec.name, found.models, now)

    _in_db(ctx, add, change=True)
    typer.echo(f"added account {spec.name} ({spec.kind}{expiry}{told(found)})")


@accounts_app.command("list")
def accounts_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the accounts with their state, the models they serve, their limits (configured, and learned from
    the upstream's 429s) and masked key. An account whose credential the server could not load (an env:VAR
    unset in the server's environment) shows auth_dead and why."""
    async def read(session: AsyncSession, now: float) -> list[dict[str, Any]]:
        return [account_view(row, now) for row in await AccountRepository(session).list()]

    views = _in_db(ctx, read)
    now = _state(ctx).clock.time()
    if as_json:
        typer.echo(json.dumps(views, indent=2, ensure_ascii=False))
        return
    if not views:
        typer.echo(f"no accounts yet in {where_of(_state(ctx).db_url)}: add one with 'kimi-pool accounts add' or "
                   "'accounts import'")
        return
    table = Table("name", "kind", "state", "until", "reason", "models", "limits", "weight", "key", "expires")
    for view in views:
        expires = view["token_expires"]
        table.add_row(
            view["name"], view["kind"], view["state"], _human_time(view["until"], now),
            view["reason"] or "-", _models_cell(view), _limits_cell(view), f"{view['weight']:g}", view["key"],
            "-" if expires is None else _token_expiry(expires, now),
        )
    _console().print(table)


@accounts_app.command("disable")
def accounts_disable(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(show_default=False)],
    reason: Annotated[str, typer.Option(metavar="TEXT", help="Shown by 'accounts list'.")] = OPERATOR_REASON,
) -> None:
    """Take an account out of the pool until it is enabled again."""
    _in_db(ctx, lambda session, now: AccountRepository(session).set_enabled(name, False, reason, now),
           change=True)
    typer.echo(f"disabled account {name}")


@accounts_app.command("enable")
def accounts_enable(ctx: typer.Context, name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Put an account back in the pool; also clears a dead, cooling or exhausted state."""
    _in_db(ctx, lambda session, now: AccountRepository(session).set_enabled(name, True, None, now), change=True)
    typer.echo(f"enabled account {name} (state reset to active)")


@accounts_app.command("remove")
def accounts_remove(ctx: typer.Context, name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Delete an account. Its usage history is kept."""
    _in_db(ctx, lambda session, _now: AccountRepository(session).remove(name), scrub=True, change=True)
    typer.echo(f"removed account {name}")


@accounts_app.command("import")
def accounts_import(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(metavar="FILE", help="An accounts.toml (see accounts.example.toml).",
                                         show_default=False)],
) -> None:
    """Create or update every account of an accounts.toml; accounts not in the file are left alone."""
    config = load_accounts_toml(path)

    async def upsert_all(session: AsyncSession, now: float) -> list[str]:
        return list(await import_config(session, config, now))

    results = _in_db(ctx, upsert_all, scrub=True, change=True)  # an updated account may have had its key replaced
    for spec in config.accounts:  # once stored: a command that fails says only why
        warn_unset(spec)
    counts = ", ".join(f"{results.count(what)} {what}" for what in ("created", "updated", "unchanged"))
    aliases = f"; {len(config.aliases)} alias(es)" if config.aliases else ""
    typer.echo(f"imported {path}: {counts}{aliases}")


@accounts_app.command("check")
def accounts_check(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(
        metavar="NAME", help="The account to probe (a disabled one too); default: every enabled account.",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> int:
    """Probe accounts with one free upstream request each, and record what it says.

    A working account goes back to active; a rejected key becomes auth_dead; no credit, quota_exhausted.

    A running server on the same SQLite database adopts the new states at once. Exit status 0 if every probed
    account works, else 1.
    """
    from app.probe import ProbeResult, probe_accounts  # the upstream client: only for the commands using it
    from app.upstreams.http import create_session
    from app.upstreams.registry import Registry

    state = _state(ctx)
    settings = Settings.from_env(db_url=state.db_url)

    async def check() -> list[ProbeResult]:
        database = existing_database(state.db_url)
        try:
            await ensure_tables(database)
            async with create_session(settings) as session:
                registry = Registry.default(session, state.clock)
                try:
                    results = await probe_accounts(database, registry, state.clock,
                                                   None if name is None else [name])
                except ConfigError as exc:
                    raise naming(database, exc) from None
                finally:
                    await registry.close()
        finally:
            await database.dispose()
        await tell_running_server(state.db_url)
        return results

    results = asyncio.run(check())
    if as_json:
        typer.echo(json.dumps([asdict(result) for result in results], indent=2, ensure_ascii=False))
    elif not results:
        typer.echo("no enabled accounts to check")
    else:
        table = Table("name", "kind", "state", "detail")
        for result in results:
            change = result.before if result.after == result.before else f"{result.before} → {result.after}"
            table.add_row(result.name, result.kind, change, result.detail)
        _console().print(table)
    return 0 if all(result.outcome != "failed" for result in results) else 1


def _token_expiry(expires_at: float, now: float) -> str:
    return TokenInfo("", expires_at, None).describe(now)


def _models_cell(view: dict[str, Any]) -> str:
    source = view["models_source"]
    if source == "configured":
        return ", ".join(view["serves"])
    return f"{len(view['serves'])} from upstream" if source == "upstream" else "default"


def _limits_cell(view: dict[str, Any]) -> str:
    """``rpm=3 (learned, configured 60) tpm=100000``: the effective limits, saying which were learned."""
    cells = []
    for bucket in ("rpm", "tpm", "tpd", "concurrency"):
        effective = view["effective_limits"][bucket]
        if bucket in view["learned_limits"]:
            configured = view[bucket]
            cells.append(f"{bucket}={effective} (learned" + ("" if configured is None else
                                                             f", configured {configured}") + ")")
        elif view[bucket] is not None:
            cells.append(f"{bucket}={view[bucket]}")
    return " ".join(cells) or "-"
