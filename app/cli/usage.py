"""``kimi-pool usage``: what the gateway served, per account, client key, model or UTC day."""

from __future__ import annotations

import enum
import json
from typing import Annotated

import typer
from rich.table import Table

from app.cli.support import cli_state as _state
from app.cli.support import console as _console
from app.cli.support import in_db as _in_db
from app.errors import ConfigError
from app.store.repository import MASTER_KEY_NAME
from app.store.usage import UsageGroup, UsageLine, UsageRepository
from app.views import usage_numbers
from app.when import WHEN_HELP, duration_seconds, parse_when, utc

MASTER = MASTER_KEY_NAME


class By(enum.StrEnum):
    account = "account"
    key = "key"
    model = "model"
    day = "day"


def usage(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(metavar="WHEN", help=f"Start of the report: {WHEN_HELP}.")] = "24h",
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
        raise ConfigError(f"--since ({utc(start)}) must be before --until ({utc(end)})")
    group: UsageGroup = by.value
    lines = _in_db(ctx, lambda session, _now: UsageRepository(session).report(start, end, group))
    total = UsageLine.total(lines)
    if as_json:
        typer.echo(json.dumps({"since": start, "until": end, "by": by.value,
                               "rows": [{by.value: line.group, **usage_numbers(line)} for line in lines],
                               "total": usage_numbers(total)}, indent=2, ensure_ascii=False))
        return
    relative = until is None and duration_seconds(since) is not None
    window = f"in the last {since.strip()}" if relative else f"from {utc(start)} to {utc(end)}"
    if not lines:
        typer.echo(f"no requests recorded {window}")
        return
    table = Table("day (UTC)" if by is By.day else by.value, "requests", "ok", "errors", "prompt tokens",
                  "completion tokens", "total tokens", "avg ms", "streams", title=f"usage {window}, by {by.value}",
                  caption=f"{utc(start)} to {utc(end)}" if relative else None)
    for column in table.columns[1:]:
        column.justify = "right"
    for line in lines:
        table.add_row(_label(by, line.group), *_cells(line))
    table.add_section()
    table.add_row("total", *_cells(total), style="bold")
    _console().print(table)


def _parse_when(text: str, now: float, option: str) -> float:
    try:
        return parse_when(text, now)
    except ValueError:
        raise ConfigError(f"bad {option} {text!r}: use {WHEN_HELP}") from None


def _label(by: By, group: str | None) -> str:
    if by is By.key:
        return "(master)" if group == MASTER else "(no key)" if group is None else group
    return "-" if group is None else group


def _cells(line: UsageLine) -> list[str]:
    return [f"{line.requests:,}", f"{line.ok:,}", f"{line.errors:,}", f"{line.prompt_tokens:,}",
            f"{line.completion_tokens:,}", f"{line.total_tokens:,}", f"{line.avg_latency_ms:,.1f}", f"{line.streams:,}"]
