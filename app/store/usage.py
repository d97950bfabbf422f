"""Usage records: the driver-level bulk insert the write-behind uses, totals, and the grouped
reports and time series behind ``kimi-pool usage``, the admin API and the dashboard.

Like the other repositories it never commits: the caller owns the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import operator
from collections.abc import Sequence
from typing import Any, Literal, cast

from sqlalchemy import Integer, Table, case, func, insert, literal_column, select
from sqlalchemy import cast as sql_cast
from sqlalchemy.ext.asyncio import AsyncSession

from app.store.models import UsageRow
from app.store.records import UsageRecord, UsageTotals
from app.store.repository import CHUNK

UsageGroup = Literal["account", "key", "model", "day"]
SeriesGroup = Literal["account", "key", "model"]

_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))
_USAGE_TABLE = cast(Table, UsageRow.__table__)
_usage_row = operator.attrgetter(*_USAGE_FIELDS)
_PLACEHOLDERS = {"qmark": "?", "format": "%s", "numeric": ":{}", "numeric_dollar": "${}"}


def _usage_insert_sql(paramstyle: str) -> str | None:
    mark = _PLACEHOLDERS.get(paramstyle)
    if mark is None:
        return None
    marks = ", ".join(mark.format(n) for n in range(1, len(_USAGE_FIELDS) + 1))
    return f"INSERT INTO usage ({', '.join(_USAGE_FIELDS)}) VALUES ({marks})"


class UsageRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add_many(self, records: Sequence[UsageRecord]) -> None:
        """Insert in chunks of plain tuples through the driver: ~2.5 µs a row where the ORM or a Core
        insert of dicts took ~5-7 µs, on the event loop's thread. Chunks keep each pause short."""
        if not records:
            return
        connection = await self._session.connection()
        sql = _usage_insert_sql(connection.dialect.paramstyle)
        if sql is None:  # a named paramstyle: let SQLAlchemy bind the dicts
            await self._session.execute(insert(_USAGE_TABLE), [dataclasses.asdict(r) for r in records])
            return
        rows = [_usage_row(r) for r in records]
        for start in range(0, len(rows), CHUNK):
            await connection.exec_driver_sql(sql, rows[start:start + CHUNK])

    async def totals(self, since: float) -> UsageTotals:
        """Requests, failures (HTTP status >= 400) and tokens since ``since``."""
        row = (await self._session.execute(
            select(
                func.count(UsageRow.id),
                func.coalesce(func.sum(case((UsageRow.status >= 400, 1), else_=0)), 0),
                func.coalesce(func.sum(UsageRow.prompt_tokens), 0),
                func.coalesce(func.sum(UsageRow.completion_tokens), 0),
            ).where(UsageRow.ts >= since)
        )).one()
        return UsageTotals(*(int(value) for value in row))

    async def report(self, since: float, until: float, by: UsageGroup) -> list[UsageLine]:
        """One line per account, client key name, model or UTC day (``YYYY-MM-DD``) of the requests with
        ``since <= ts < until``: days in order, the others busiest first. A request refused before an
        account was chosen has ``group`` None under ``account``; one on an open gateway, under ``key``."""
        group = (await self._usage_group(by)).label("grp")
        rows = await self._session.execute(
            select(group, *_line_columns())
            .where(UsageRow.ts >= since, UsageRow.ts < until)
            .group_by(group)
        )
        lines = [_line(_day(grp) if by == "day" else grp, numbers) for grp, *numbers in rows]
        if by == "day":
            return sorted(lines, key=lambda line: line.group or "")
        return sorted(lines, key=lambda line: (-line.requests, line.group is None, line.group or ""))

    async def _usage_group(self, by: UsageGroup) -> Any:
        """The column (or, for ``day``, the days since the epoch in UTC) to group by."""
        if by == "account":
            return UsageRow.account
        if by == "key":
            return UsageRow.client_key
        if by == "model":
            return UsageRow.model
        if by != "day":
            raise ValueError(f"cannot group usage by {by!r}")
        return await self._buckets(86400)

    async def series(self, since: float, until: float, step: int, by: SeriesGroup) -> list[SeriesPoint]:
        """The usage of ``since <= ts < until`` per account, client key name or model and per ``step``
        seconds, in one GROUP BY: a point for each group and bucket that saw a request, the bucket named
        by its start (a multiple of ``step`` seconds since the epoch); in time order, then by group."""
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"a series step is a whole number of seconds >= 1, not {step!r}")
        group = (await self._usage_group(by)).label("grp")
        bucket = (await self._buckets(step)).label("bucket")
        rows = await self._session.execute(
            select(group, bucket, *_line_columns())
            .where(UsageRow.ts >= since, UsageRow.ts < until)
            .group_by(group, bucket)
        )
        points: list[SeriesPoint] = [(int(start) * step, _line(grp, numbers)) for grp, start, *numbers in rows]
        return sorted(points, key=lambda point: (point[0], point[1].group is None, point[1].group or ""))

    async def failures(self, since: float, limit: int = 20) -> Sequence[UsageRow]:
        """The latest requests since ``since`` that did not end with status 200, newest first. (The
        window bounds the rows read, walking the ``ts`` index back from now.)"""
        return (await self._session.scalars(
            select(UsageRow).where(UsageRow.ts >= since, UsageRow.status != 200)
            .order_by(UsageRow.ts.desc(), UsageRow.id.desc()).limit(limit)
        )).all()

    async def _buckets(self, step: int) -> Any:
        """``floor(ts / step)``: the number of the ``step``-second bucket since the epoch a request is in."""
        # A literal, not a bound parameter, so that PostgreSQL sees the select and the GROUP BY as one expression.
        buckets = UsageRow.ts / literal_column(str(int(step)))
        if (await self._session.connection()).dialect.name == "sqlite":
            return sql_cast(buckets, Integer)  # truncation is floor for ts >= 0; SQLite's floor() is an optional extra
        return func.floor(buckets)  # not CAST: PostgreSQL rounds


def _line_columns() -> tuple[Any, ...]:
    """What a ``UsageLine`` sums, as the columns of a grouped select (``_line`` reads them back)."""
    return (
        func.count(UsageRow.id),
        func.sum(case((UsageRow.status == 200, 1), else_=0)),
        func.sum(UsageRow.prompt_tokens),
        func.sum(UsageRow.completion_tokens),
        func.sum(UsageRow.latency_ms),
        func.sum(case((UsageRow.stream, 1), else_=0)),
    )


def _line(group: str | None, numbers: Sequence[Any]) -> UsageLine:
    requests, ok, prompt, completion, latency, streams = numbers
    return UsageLine(group, int(requests), int(ok), int(prompt or 0), int(completion or 0), float(latency or 0.0),
                     int(streams))


@dataclasses.dataclass(frozen=True, slots=True)
class UsageLine:
    """The usage of one group (an account, a client key name, a model or a UTC day) over a window."""

    group: str | None
    requests: int = 0
    ok: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0  # summed over the requests
    streams: int = 0

    @property
    def errors(self) -> int:
        """Requests that did not end with status 200."""
        return self.requests - self.ok

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def avg_latency_ms(self) -> float:
        return self.latency_ms / self.requests if self.requests else 0.0

    @classmethod
    def total(cls, lines: Sequence[UsageLine]) -> UsageLine:
        """The sum of ``lines``, with no group."""
        return cls(None, requests=sum(line.requests for line in lines), ok=sum(line.ok for line in lines),
                   prompt_tokens=sum(line.prompt_tokens for line in lines),
                   completion_tokens=sum(line.completion_tokens for line in lines),
                   latency_ms=sum(line.latency_ms for line in lines), streams=sum(line.streams for line in lines))


SeriesPoint = tuple[int, UsageLine]
"""One point of a usage series: the start of its bucket (seconds since the epoch) and the usage in it."""


def _day(days: float) -> str:
    return dt.datetime.fromtimestamp(int(days) * 86400, dt.UTC).date().isoformat()
