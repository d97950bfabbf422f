"""``kimi-pool sessions``: which account holds which conversation."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from app.cli.support import cli_state as _state
from app.cli.support import console as _console
from app.cli.support import human_time as _human_time
from app.cli.support import in_db as _in_db
from app.cli.support import parse_duration as _parse_duration
from app.store.sessions import SessionRepository
from app.views import session_view

sessions_app = typer.Typer(name="sessions", no_args_is_help=True,
                           help="Inspect and purge conversation sessions (which account holds which conversation).")


# --- sessions -------------------------------------------------------------------------------------

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
    views = [session_view(row, now) for row in rows]
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


def _shorten(key: str, width: int = 40) -> str:
    return key if len(key) <= width else key[:width - 1] + "…"
