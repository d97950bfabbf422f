"""The ``kimi-pool`` command line.

Commands are thin: parse, open the database (migrating it first), call a repository inside one
transaction, print. ``run(argv)`` is the whole program: every failure becomes one line on stderr
and a non-zero exit status, never a traceback. Secrets are printed masked, and never logged.
"""

import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts_config import load_accounts_toml, make_account_spec
from app.cli_batch import batch_app
from app.cli_models import models_app
from app.cli_servers import emulate_app, serve
from app.cli_sessions import sessions_app
from app.cli_support import PROG, CliState
from app.cli_support import cli_state as _state
from app.cli_support import console as _console
from app.cli_support import human_time as _human_time
from app.cli_support import in_db as _in_db
from app.cli_usage import usage
from app.clock import SystemClock
from app.config import DEFAULT_DB_URL, Settings
from app.errors import ConfigError, KimiPoolError
from app.kimi_auth import TokenInfo, check_fresh
from app.store.db import Database
from app.store.repository import AccountRepository, ClientKeyRepository, import_config
from app.views import OPERATOR_REASON, account_view, key_view

app = typer.Typer(name=PROG, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
accounts_app = typer.Typer(name="accounts", no_args_is_help=True,
                           help="Manage the upstream accounts of the pool.")
keys_app = typer.Typer(name="keys", no_args_is_help=True,
                       help="Manage the API keys clients use to call kimi-pool.")
db_app = typer.Typer(name="db", no_args_is_help=True, help="Database maintenance.")
app.add_typer(accounts_app)
app.add_typer(keys_app)
app.add_typer(db_app)
app.add_typer(sessions_app)
app.add_typer(models_app)
app.add_typer(emulate_app)
app.add_typer(batch_app)
app.command("serve")(serve)
app.command("usage")(usage)


@app.callback()
def _global_options(
    ctx: typer.Context,
    db_url: Annotated[str, typer.Option(
        "--db", envvar="KIMI_POOL_DB", metavar="URL", show_default=False,
        help=f"Database URL. Default: $KIMI_POOL_DB, else {DEFAULT_DB_URL}",
    )] = DEFAULT_DB_URL,
) -> None:
    """kimi-pool: one OpenAI-compatible endpoint in front of a pool of Kimi accounts."""
    ctx.obj = CliState(db_url=db_url, clock=SystemClock())


# --- accounts -------------------------------------------------------------------------------------


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
) -> None:
    """Add an account. Give secrets as env:VAR to keep them out of the database and shell history."""
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
    _in_db(ctx, lambda session, now: AccountRepository(session).add(spec, now))
    typer.echo(f"added account {spec.name} ({spec.kind}{expiry})")


@accounts_app.command("list")
def accounts_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the accounts with their state, limits and masked key."""
    rows = _in_db(ctx, lambda session, _now: AccountRepository(session).list())
    now = _state(ctx).clock.time()
    views = [account_view(row) for row in rows]
    if as_json:
        typer.echo(json.dumps(views, indent=2, ensure_ascii=False))
        return
    if not views:
        typer.echo("no accounts yet: add one with 'kimi-pool accounts add' or 'accounts import'")
        return
    table = Table("name", "kind", "state", "until", "reason", "models", "limits", "weight", "key", "expires")
    for view in views:
        limits = [f"{k}={view[k]}" for k in ("rpm", "tpm", "tpd", "concurrency") if view[k] is not None]
        expires = view["token_expires"]
        table.add_row(
            view["name"], view["kind"], view["state"], _human_time(view["until"], now),
            view["reason"] or "-", ", ".join(view["models"]) or "default", " ".join(limits) or "-",
            f"{view['weight']:g}", view["key"], "-" if expires is None else _token_expiry(expires, now),
        )
    _console().print(table)


@accounts_app.command("disable")
def accounts_disable(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(show_default=False)],
    reason: Annotated[str, typer.Option(metavar="TEXT", help="Shown by 'accounts list'.")] = OPERATOR_REASON,
) -> None:
    """Take an account out of the pool until it is enabled again."""
    _in_db(ctx, lambda session, now: AccountRepository(session).set_enabled(name, False, reason, now))
    typer.echo(f"disabled account {name}")


@accounts_app.command("enable")
def accounts_enable(ctx: typer.Context, name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Put an account back in the pool; also clears a dead, cooling or exhausted state."""
    _in_db(ctx, lambda session, now: AccountRepository(session).set_enabled(name, True, None, now))
    typer.echo(f"enabled account {name} (state reset to active)")


@accounts_app.command("remove")
def accounts_remove(ctx: typer.Context, name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Delete an account. Its usage history is kept."""
    _in_db(ctx, lambda session, _now: AccountRepository(session).remove(name))
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

    results = _in_db(ctx, upsert_all)
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

    A running server picks the change up within seconds. Exit status 0 if every probed account works, else 1.
    """
    from app.probe import ProbeResult, probe_accounts  # the upstream client: only for the commands using it
    from app.upstreams.http import create_session
    from app.upstreams.registry import Registry

    state = _state(ctx)
    settings = Settings.from_env(db_url=state.db_url)

    async def check() -> list[ProbeResult]:
        database = Database(state.db_url)
        try:
            await database.upgrade()
            async with create_session(settings) as session:
                registry = Registry.default(session, state.clock)
                try:
                    return await probe_accounts(database, registry, state.clock, None if name is None else [name])
                finally:
                    await registry.close()
        finally:
            await database.dispose()

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


# --- keys -----------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(ctx: typer.Context, name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Create a client API key and print it. Only its hash is stored: it is shown this once."""
    key = _in_db(ctx, lambda session, now: ClientKeyRepository(session).create(name, now))
    typer.echo(key)
    typer.echo(f"key {name} created; it will not be shown again, so store it now", err=True)


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List client API keys (by prefix; the keys themselves are not stored)."""
    rows = _in_db(ctx, lambda session, _now: ClientKeyRepository(session).list())
    now = _state(ctx).clock.time()
    views = [key_view(row) for row in rows]
    if as_json:
        typer.echo(json.dumps(views, indent=2))
        return
    if not views:
        typer.echo("no keys yet: create one with 'kimi-pool keys create NAME'")
        return
    table = Table("name", "key", "created", "status")
    for view in views:
        status = "active" if view["revoked_at"] is None else f"revoked {_human_time(view['revoked_at'], now)}"
        table.add_row(view["name"], f"{view['prefix']}…", _human_time(view["created_at"], now), status)
    _console().print(table)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Revoke a client API key; requests with it are refused from then on."""
    revoked = _in_db(ctx, lambda session, now: ClientKeyRepository(session).revoke(name, now))
    typer.echo(f"revoked key {name}" if revoked else f"key {name} was already revoked")


# --- db -------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the database schema to the latest revision (safe to repeat)."""

    async def upgrade() -> tuple[str, str | None]:
        database = Database(_state(ctx).db_url)
        try:
            return database.display_url, await database.upgrade()
        finally:
            await database.dispose()

    url, revision = asyncio.run(upgrade())
    typer.echo(f"{url}: schema at revision {revision}")


# --- plumbing -------------------------------------------------------------------------------------


def _token_expiry(expires_at: float, now: float) -> str:
    return TokenInfo("", expires_at, None).describe(now)


def _fail(message: str, code: int) -> int:
    lines = str(message).strip().splitlines() or [""]
    print(f"{PROG}: error: {' '.join(line.strip() for line in lines)}", file=sys.stderr)
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=PROG, standalone_mode=False)
    except KimiPoolError as exc:
        return _fail(exc.message, 1)
    except (typer.Abort, KeyboardInterrupt):
        print(f"{PROG}: aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # click's errors, as vendored by typer
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed (rich) or is the message
            if help_text := exc.format_message().strip():
                print(help_text, file=sys.stderr)
            return 2
        if ctx is None:
            return _fail(exc.format_message(), exc.exit_code or 1)
        return _fail(f"{exc.format_message()} (see '{ctx.command_path} --help')", exc.exit_code or 2)
    except Exception as exc:  # a bug: still one line (no traceback, no bound SQL parameters)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return _fail(f"unexpected {type(exc).__name__}: {first_line}", 1)
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run())
