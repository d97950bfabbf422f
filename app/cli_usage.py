"""``kimi-pool usage``: what the gateway served, per account, client key, model or UTC day."""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli_support import cli_state as _state
from app.cli_support import console as _console
from app.cli_support import duration_seconds
from app.cli_support import in_db as _in_db
from app.errors import ConfigError
from app.store.repository import MASTER_KEY_NAME, UsageGroup, UsageLine, UsageRepository

MASTER = MASTER_KEY_NAME
_WHEN_HELP = "a duration back from now (30m, 24h, 7d, 2w) or a UTC date or time (2026-11-01, 2026-11-01T08:00)"


class By(enum.StrEnum):
    account = "account"
    key = "key"
    model = "model"
    day = "day"


def usage(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(metavar="WHEN", help=f"Start of the report: {_WHEN_HELP}.")] = "24h",
    until: Annotated[str | None, typer.Option(
        metavar="WHEN", help="End of the report (excluded), in the same forms.", show_default="now")] = None,
    by: Annotated[By, typer.Option(help="One line per account, client key, model or day (days are UTC).")]
    = By.account,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Report the requests served, one line per account, client key, model or UTC day, with a total.

    Each line counts requests, ok (status 200), errors, tokens, the mean latency and the streamed requests.

    Account '-' is requests refused before an account was chosen (e.g. a 429 from the queue).

    Key '(master)' is the master key. A running server writes usage behind, within a second or so.
    """
    now = _state(ctx).clock.time()
    start = _parse_when(since, now, "--since")
    end = now if until is None else _parse_when(until, now, "--until")
    if start >= end:
        raise ConfigError(f"--since ({_utc(start)}) must be before --until ({_utc(end)})")
    group: UsageGroup = by.value
    lines = _in_db(ctx, lambda session, _now: UsageRepository(session).report(start, end, group))
    total = UsageLine.total(lines)
    if as_json:
        typer.echo(json.dumps({"since": start, "until": end, "by": by.value,
                               "rows": [{by.value: line.group, **_numbers(line)} for line in lines],
                               "total": _numbers(total)}, indent=2, ensure_ascii=False))
        return
    relative = until is None and duration_seconds(since) is not None
    window = f"in the last {since.strip()}" if relative else f"from {_utc(start)} to {_utc(end)}"
    if not lines:
        typer.echo(f"no requests recorded {window}")
        return
    table = Table("day (UTC)" if by is By.day else by.value, "requests", "ok", "errors", "prompt tokens",
                  "completion tokens", "total tokens", "avg ms", "streams", title=f"usage {window}, by {by.value}",
                  caption=f"{_utc(start)} to {_utc(end)}" if relative else None)
    for column in table.columns[1:]:
        column.justify = "right"
    for line in lines:
        table.add_row(_label(by, line.group), *_cells(line))
    table.add_section()
    table.add_row("total", *_cells(total), style="bold")
    _console().print(table)


def _parse_when(text: str, now: float, option: str) -> float:
    seconds = duration_seconds(text)
    if seconds is not None:
        return max(0.0, now - seconds)  # a span longer than the epoch is "since the beginning"
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"bad {option} {text!r}: use {_WHEN_HELP}") from None
    return (when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)).timestamp()


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _label(by: By, group: str | None) -> str:
    if by is By.key:
        return "(master)" if group == MASTER else "(no key)" if group is None else group
    return "-" if group is None else group


def _numbers(line: UsageLine) -> dict[str, Any]:
    return {"requests": line.requests, "ok": line.ok, "errors": line.errors, "prompt_tokens": line.prompt_tokens,
            "completion_tokens": line.completion_tokens, "total_tokens": line.total_tokens,
            "avg_latency_ms": round(line.avg_latency_ms, 1), "streams": line.streams}


def _cells(line: UsageLine) -> list[str]:
    return [f"{line.requests:,}", f"{line.ok:,}", f"{line.errors:,}", f"{line.prompt_tokens:,}",
            f"{line.completion_tokens:,}", f"{line.total_tokens:,}", f"{line.avg_latency_ms:,.1f}", f"{line.streams:,}"]
