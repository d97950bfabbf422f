"""The ``kimi-pool`` command line.

Commands are thin: parse, open the database (migrating it first), call a repository inside one
transaction, print. ``run(argv)`` is the whole program: every failure becomes one line on stderr
and a non-zero exit status, never a traceback. Secrets are printed masked, and never logged.
"""

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from app.clock import Clock, SystemClock
from app.config import DEFAULT_DB_URL, Settings, load_accounts_toml, make_account_spec, mask_secret
from app.errors import ConfigError, KimiPoolError
from app.store.db import Database
from app.store.models import AccountRow, ClientKeyRow, SessionRow
from app.store.repository import AccountRepository, ClientKeyRepository, SessionRepository

PROG = "kimi-pool"
OPERATOR_REASON = "disabled by operator"
_T = TypeVar("_T")

app = typer.Typer(name=PROG, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
accounts_app = typer.Typer(name="accounts", no_args_is_help=True,
                           help="Manage the upstream accounts of the pool.")
keys_app = typer.Typer(name="keys", no_args_is_help=True,
                       help="Manage the API keys clients use to call kimi-pool.")
db_app = typer.Typer(name="db", no_args_is_help=True, help="Database maintenance.")
sessions_app = typer.Typer(name="sessions", no_args_is_help=True,
                           help="Inspect and purge conversation sessions (which account holds which conversation).")
app.add_typer(accounts_app)
app.add_typer(keys_app)
app.add_typer(db_app)
app.add_typer(sessions_app)


@dataclass(frozen=True, slots=True)
class CliState:
    """What the global options give every command (``ctx.obj``)."""

    db_url: str
    clock: Clock


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
) -> None:
    """Add an account. Give secrets as env:VAR to keep them out of the database and shell history."""
    if api_key is not None and token is not None:
        raise ConfigError("give only one of --api-key and --token")
    spec = make_account_spec(
        name=name, kind=kind, secret=api_key if api_key is not None else token, base_url=base_url,
        models=model or [], rpm=rpm, tpm=tpm, tpd=tpd, concurrency=concurrency, weight=weight,
        proxy=proxy,
    )
    _in_db(ctx, lambda session, now: AccountRepository(session).add(spec, now))
    typer.echo(f"added account {spec.name} ({spec.kind})")


@accounts_app.command("list")
def accounts_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the accounts with their state, limits and masked key."""
    rows = _in_db(ctx, lambda session, _now: AccountRepository(session).list())
    now = _state(ctx).clock.time()
    views = [_account_view(row) for row in rows]
    if as_json:
        typer.echo(json.dumps(views, indent=2, ensure_ascii=False))
        return
    if not views:
        typer.echo("no accounts yet: add one with 'kimi-pool accounts add' or 'accounts import'")
        return
    table = Table("name", "kind", "state", "until", "reason", "models", "limits", "weight", "key")
    for view in views:
        limits = [f"{k}={view[k]}" for k in ("rpm", "tpm", "tpd", "concurrency") if view[k] is not None]
        table.add_row(
            view["name"], view["kind"], view["state"], _human_time(view["until"], now),
            view["reason"] or "-", ", ".join(view["models"]) or "default", " ".join(limits) or "-",
            f"{view['weight']:g}", view["key"],
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
    specs = load_accounts_toml(path)

    async def upsert_all(session: AsyncSession, now: float) -> list[str]:
        repo = AccountRepository(session)
        return [await repo.upsert(spec, now) for spec in specs]

    results = _in_db(ctx, upsert_all)
    counts = ", ".join(f"{results.count(what)} {what}" for what in ("created", "updated", "unchanged"))
    typer.echo(f"imported {path}: {counts}")


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
    views = [_key_view(row) for row in rows]
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


# --- sessions -------------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@sessions_app.command("list")
def sessions_list(
    ctx: typer.Context,
    account: Annotated[str | None, typer.Option(metavar="NAME", help="Only this account's sessions.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (with the full keys) instead of a table.")]
    = False,
) -> None:
    """List conversation sessions, most recently used first, with the account that holds each.

    A running server writes the time of last use behind, at most once a minute per session.
    """
    rows = _in_db(ctx, lambda session, _now: SessionRepository(session).list(account=account, limit=limit))
    now = _state(ctx).clock.time()
    views = [_session_view(row, now) for row in rows]
    if as_json:
        typer.echo(json.dumps(views, indent=2, ensure_ascii=False))
        return
    if not views:
        typer.echo(f"no sessions of account {account}" if account is not None else "no sessions")
        return
    table = Table("key", "account", "last used", "expires")
    for view in views:
        table.add_row(_shorten(view["key"]), view["account"], _human_time(view["last_used"], now),
                      ("expired " if view["expired"] else "") + _human_time(view["expires_at"], now))
    _console().print(table)


@sessions_app.command("purge")
def sessions_purge(
    ctx: typer.Context,
    older_than: Annotated[str | None, typer.Option(
        metavar="DURATION", help="Also purge sessions unused this long, e.g. 30m, 12h or 7d.")] = None,
) -> None:
    """Delete expired sessions, and with --older-than those unused for that long.

    A running server keeps its own copy of the sessions in memory and may write a purged one back until restarted.
    """
    seconds = None if older_than is None else _parse_duration(older_than)
    purged = _in_db(ctx, lambda session, now: SessionRepository(session).purge(
        now, None if seconds is None else now - seconds))
    typer.echo(f"purged {purged} session{'' if purged == 1 else 's'}")


def _parse_duration(text: str) -> float:
    """``30m``, ``12h``, ``7d`` (also ``s`` and ``w``) → seconds."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise ConfigError(f"bad duration {text!r}: use a number and a unit (s, m, h, d or w), e.g. 30m, 12h or 7d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _session_view(row: SessionRow, now: float) -> dict[str, Any]:
    return {"key": row.key, "account": row.account, "chat_id": row.chat_id, "parent_id": row.parent_id,
            "last_used": row.last_used, "expires_at": row.expires_at, "expired": row.expires_at <= now}


def _shorten(key: str, width: int = 40) -> str:
    return key if len(key) <= width else key[:width - 1] + "…"


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


def _state(ctx: typer.Context) -> CliState:
    state = ctx.find_root().obj
    assert isinstance(state, CliState)
    return state


def _in_db(ctx: typer.Context, work: Callable[[AsyncSession, float], Awaitable[_T]]) -> _T:
    """Open the database, bring its schema up to date, run ``work`` in one transaction, close."""
    state = _state(ctx)

    async def main() -> _T:
        database = Database(state.db_url)
        try:
            await database.upgrade()
            async with database.session() as session, session.begin():
                return await work(session, state.clock.time())
        finally:
            await database.dispose()

    return asyncio.run(main())


def _console() -> Console:
    # Piped output is not cut to 80 columns; no markup, so names and reasons print as they are.
    return Console(width=None if sys.stdout.isatty() else 200, markup=False, highlight=False, emoji=False)


def _account_view(row: AccountRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "kind": row.kind,
        "enabled": row.enabled,
        "state": row.state if row.enabled else "disabled",
        "runtime_state": row.state,
        "until": row.state_until if row.enabled else None,
        "reason": row.state_reason if row.enabled else row.disabled_reason,
        "base_url": _mask_url(row.base_url),
        "models": list(row.models or ()),
        "rpm": row.rpm,
        "tpm": row.tpm,
        "tpd": row.tpd,
        "concurrency": row.concurrency,
        "weight": row.weight,
        "proxy": _mask_url(row.proxy),
        "key": mask_secret(row.secret),
        "config_rev": row.config_rev,
    }


def _key_view(row: ClientKeyRow) -> dict[str, Any]:
    return {"name": row.name, "prefix": row.key_prefix, "created_at": row.created_at,
            "revoked_at": row.revoked_at}


def _mask_url(url: str | None) -> str | None:
    """Hide credentials in a URL (``http://user:pass@host`` → ``http://***@host``)."""
    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _human_time(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    seconds = abs(ts - now)
    if seconds < 60:
        span = f"{seconds:.0f}s"
    elif seconds < 3600:
        span = f"{seconds // 60:.0f}m"
    elif seconds < 2 * 86400:
        span = f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    else:
        span = f"{seconds // 86400:.0f}d"
    when = datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    return f"{when} (in {span})" if ts >= now else f"{when} ({span} ago)"


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


# --- servers --------------------------------------------------------------------------------------


@app.command("serve")
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


@app.command("emulate")
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
