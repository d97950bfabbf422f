"""What the command modules share: the global state, the database helper, the console, times and durations."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import typer
from rich.console import Console
from sqlalchemy.ext.asyncio import AsyncSession

from app.clock import Clock
from app.config import DEFAULT_DB_URL
from app.errors import ConfigError, KimiPoolError, NoDatabase
from app.notify import tell_server
from app.store.db import Database
from app.when import duration_seconds

PROG = "kimi-pool"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CliState:
    """What the global options give every command (``ctx.obj``)."""

    db_url: str
    clock: Clock


def cli_state(ctx: typer.Context) -> CliState:
    state = ctx.find_root().obj
    assert isinstance(state, CliState)
    return state


_ELSEWHERE = (": point at yours with --db URL or KIMI_POOL_DB (the default, {default}, is in the current "
              "directory), or create one with 'kimi-pool db upgrade' ('kimi-pool serve' creates it too)")


def existing_database(url: str) -> Database:
    """The database at ``url``, which must exist: a command never creates one by accident (the default
    URL is relative to the current directory). Call ``ensure_tables`` once it is open."""
    try:
        return Database(url, create=False)
    except NoDatabase as exc:
        raise NoDatabase(exc.message + _ELSEWHERE.format(default=DEFAULT_DB_URL)) from None


async def ensure_tables(database: Database) -> None:
    """Refuse a database without kimi-pool's tables (an empty file, the wrong PostgreSQL database);
    bring one of an older schema up to date."""
    if not await database.exists():
        raise NoDatabase(f"no kimi-pool tables in {database.where}" + _ELSEWHERE.format(default=DEFAULT_DB_URL))
    await database.upgrade()


def naming(database: Database, exc: KimiPoolError) -> KimiPoolError:
    """``exc`` with the database it is about named in its message (an account or key that is missing,
    or already there, is so in that database)."""
    exc.message = f"{exc.message} (database {database.where})"
    return exc


def in_db(ctx: typer.Context, work: Callable[[AsyncSession, float], Awaitable[_T]], *, change: bool = False,
          scrub: bool = False) -> _T:
    """Open the database (it must exist: ``existing_database``), bring its schema up to date, run
    ``work`` in one transaction, close. An error of the work names the database.

    ``change``: the work changes what a running server serves with (accounts, keys, aliases): once it
    is committed, tell a server running on this database to reload now (``tell_running_server``).
    ``scrub``: the work removed or replaced a secret; truncate the WAL afterwards (``Database.scrub``),
    which a running server's open connections would otherwise keep."""
    state = cli_state(ctx)

    async def main() -> _T:
        database = existing_database(state.db_url)
        try:
            await ensure_tables(database)
            try:
                async with database.session() as session, session.begin():
                    result = await work(session, state.clock.time())
            except KimiPoolError as exc:
                raise naming(database, exc) from None
            if scrub:
                await database.scrub()
        finally:
            await database.dispose()
        if change:
            await tell_running_server(state.db_url)
        return result

    return asyncio.run(main())


async def tell_running_server(db_url: str) -> None:
    """Have a server running on ``db_url`` reload at once, workers included (``app.notify``). No server:
    nothing to do. One that cannot be told: a warning, not an error; it reloads within seconds anyway."""
    problem = await tell_server(db_url)
    if problem is not None:
        warn(f"{problem}; it picks the change up within its sync interval (2 s)")


def warn(message: str) -> None:
    """One warning line on stderr (the command goes on, and succeeds)."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def console() -> Console:
    # Piped output is not cut to 80 columns; no markup, so names and reasons print as they are.
    return Console(width=None if sys.stdout.isatty() else 200, markup=False, highlight=False, emoji=False)


def human_time(ts: float | None, now: float) -> str:
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


def parse_duration(text: str) -> float:
    """Like ``duration_seconds``, but a bad duration is a ``ConfigError`` saying what is expected."""
    seconds = duration_seconds(text)
    if seconds is None:
        raise ConfigError(f"bad duration {text!r}: use a number and a unit (s, m, h, d or w), e.g. 30m, 12h or 7d")
    return seconds
