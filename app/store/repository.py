"""Repositories: typed reads and writes over one ``AsyncSession``.

They flush (so constraint problems surface where they happen) but never commit: the caller owns
the transaction, e.g. ``async with db.session() as s, s.begin(): await AccountRepository(s).add(...)``.
Times are passed in (``now``) from the injected clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import operator
import re
import secrets
from collections.abc import Sequence
from typing import Any, Literal, cast

from sqlalchemy import CursorResult, Integer, Table, case, delete, func, insert, literal_column, or_, select, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import AccountSpec, AliasSpec, ConfigFile
from app.errors import ConfigError
from app.kimi_auth import check_fresh
from app.pool.sessions import Binding
from app.store.models import (
    AccountRow,
    ClientKeyRow,
    HealthEventRow,
    IdempotencyRow,
    ModelAliasRow,
    SessionRow,
    UsageRow,
)
from app.store.records import IdempotentAnswer, StateChange, UsageRecord, UsageTotals

KEY_PREFIX = "kp-"
MASTER_KEY_NAME = "master"
"""The client name recorded for requests made with the master key (``app.api.auth``)."""
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UpsertResult = Literal["created", "updated", "unchanged"]
UsageGroup = Literal["account", "key", "model", "day"]
SeriesGroup = Literal["account", "key", "model"]
CONFIG_DISABLED_REASON = "disabled in accounts file"


def hash_key(key: str) -> str:
    """What is stored of a client key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class AccountRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def list(self) -> Sequence[AccountRow]:
        """All accounts, in the order they were added."""
        return (await self._session.scalars(select(AccountRow).order_by(AccountRow.id))).all()

    async def get(self, name: str) -> AccountRow:
        row = await self._find(name)
        if row is None:
            raise ConfigError(f"no account named {name}")
        return row

    async def add(self, spec: AccountSpec, now: float) -> AccountRow:
        if await self._find(spec.name) is not None:
            raise ConfigError(f"an account named {spec.name} already exists")
        row = AccountRow(name=spec.name, enabled=True, state="active", config_rev=1,
                         created_at=now, updated_at=now)
        _apply_spec(row, spec)
        self._session.add(row)
        await self._session.flush()
        return row

    async def upsert(self, spec: AccountSpec, now: float) -> UpsertResult:
        """Make the stored account match ``spec`` (import); an update bumps ``config_rev``.

        ``enabled = false`` in the file disables the account, and ``true`` undoes only that: an
        account an operator disabled (``set_enabled``) stays disabled, so a re-import or a
        restart with ``accounts_file`` does not quietly bring back a key taken out on purpose.
        """
        row = await self._find(spec.name)
        if row is None:
            await self.add(spec, now)
            return "created"
        operator_disabled = not row.enabled and row.disabled_reason != CONFIG_DISABLED_REASON
        if operator_disabled and spec.enabled:
            spec = dataclasses.replace(spec, enabled=False)
        if self.to_spec(row) == spec:
            return "unchanged"
        was_enabled = row.enabled
        _apply_spec(row, spec)
        if spec.enabled and not was_enabled:
            _revive(row)
        _touch(row, now)
        await self._session.flush()
        return "updated"

    async def set_enabled(self, name: str, enabled: bool, reason: str | None, now: float) -> AccountRow:
        """Enable or disable by operator. Enabling also revives the runtime state (e.g. ``auth_dead``)."""
        row = await self.get(name)
        row.enabled = enabled
        if enabled:
            row.disabled_reason = None
            _revive(row)
        else:
            row.disabled_reason = reason
        _touch(row, now)
        await self._session.flush()
        return row

    async def remove(self, name: str) -> None:
        await self._session.delete(await self.get(name))
        await self._session.flush()

    async def save_state(self, name: str, state: str, until: float | None, reason: str | None) -> bool:
        """Runtime state, written by the server; leaves ``config_rev`` alone. False if no such account."""
        result = await self._session.execute(
            update(AccountRow)
            .where(AccountRow.name == name)
            .values(state=state, state_until=until, state_reason=reason)
            .execution_options(synchronize_session=False)
        )
        return bool(cast(CursorResult[Any], result).rowcount)

    async def set_runtime_state(self, name: str, state: str, until: float | None, reason: str | None,
                                now: float) -> AccountRow:
        """Runtime state set by an operator's action (a probe): unlike ``save_state`` it bumps
        ``config_rev``, so a running server reloads the account and adopts the state."""
        row = await self.get(name)
        row.state, row.state_until, row.state_reason = state, until, reason
        _touch(row, now)
        await self._session.flush()
        return row

    async def revisions(self) -> dict[str, int]:
        """name → config_rev: a cheap poll that tells the server which accounts changed."""
        rows = await self._session.execute(select(AccountRow.name, AccountRow.config_rev))
        return {name: rev for name, rev in rows}

    @staticmethod
    def to_spec(row: AccountRow) -> AccountSpec:
        return AccountSpec(
            name=row.name,
            kind=row.kind,
            secret=row.secret,
            base_url=row.base_url,
            models=tuple(row.models or ()),
            rpm=row.rpm,
            tpm=row.tpm,
            tpd=row.tpd,
            concurrency=row.concurrency,
            weight=row.weight,
            proxy=row.proxy,
            enabled=row.enabled,
            extra=dict(row.options or {}),
        )

    async def _find(self, name: str) -> AccountRow | None:
        return await self._session.scalar(select(AccountRow).where(AccountRow.name == name))


def _apply_spec(row: AccountRow, spec: AccountSpec) -> None:
    row.kind = spec.kind
    row.secret = spec.secret
    row.base_url = spec.base_url
    row.models = list(spec.models)
    row.rpm, row.tpm, row.tpd, row.concurrency = spec.rpm, spec.tpm, spec.tpd, spec.concurrency
    row.weight = spec.weight
    row.proxy = spec.proxy
    row.options = dict(spec.extra)
    if spec.enabled:
        row.disabled_reason = None
    elif row.enabled:  # newly disabled, by the file; an operator's disable keeps its own reason
        row.disabled_reason = CONFIG_DISABLED_REASON
    row.enabled = spec.enabled


def _revive(row: AccountRow) -> None:
    row.state, row.state_until, row.state_reason = "active", None, None


def _touch(row: AccountRow, now: float) -> None:
    row.config_rev += 1
    row.updated_at = now


async def import_config(session: AsyncSession, config: ConfigFile, now: float) -> list[UpsertResult]:
    """Create or update every account and alias of an ``accounts.toml``; what happened to each account.

    A kimi-web token that has already lapsed is refused here, when the clock is known."""
    for spec in config.accounts:
        if spec.kind == "kimi-web" and spec.secret and not spec.secret.startswith("env:"):
            check_fresh(spec.secret, now, spec.name)
    accounts = AccountRepository(session)
    results = [await accounts.upsert(spec, now) for spec in config.accounts]
    aliases = AliasRepository(session)
    for alias in config.aliases:
        await aliases.put(alias, now)
    return results


class AliasRepository:
    """The operator's model aliases (``app.catalogue`` merges them over the built-in ones)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def list(self) -> list[AliasSpec]:
        rows = await self._session.scalars(select(ModelAliasRow).order_by(ModelAliasRow.name))
        return [AliasSpec(row.name, dict(row.targets or {})) for row in rows]

    async def put(self, alias: AliasSpec, now: float) -> UpsertResult:
        row = await self._session.get(ModelAliasRow, alias.name)
        targets = dict(alias.targets)
        if row is None:
            self._session.add(ModelAliasRow(name=alias.name, targets=targets, updated_at=now))
            result: UpsertResult = "created"
        elif dict(row.targets or {}) == targets:
            return "unchanged"
        else:
            row.targets, row.updated_at = targets, now
            result = "updated"
        await self._session.flush()
        return result

    async def remove(self, name: str) -> bool:
        result = await self._session.execute(
            delete(ModelAliasRow).where(ModelAliasRow.name == name).execution_options(synchronize_session=False))
        return bool(cast(CursorResult[Any], result).rowcount)


class ClientKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def create(self, name: str, now: float) -> str:
        """Create a key; the plaintext is returned once and only its hash and prefix are stored."""
        if not isinstance(name, str) or not _KEY_NAME.match(name):
            raise ConfigError(f"bad key name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
        if name == MASTER_KEY_NAME:
            raise ConfigError(f"the key name {name!r} is reserved: usage and logs name the master key so")
        if await self._find(name) is not None:
            raise ConfigError(f"a key named {name} already exists (revoked keys keep their name)")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        self._session.add(ClientKeyRow(name=name, key_hash=hash_key(key), key_prefix=key[:8], created_at=now))
        await self._session.flush()
        return key

    async def list(self) -> Sequence[ClientKeyRow]:
        return (await self._session.scalars(select(ClientKeyRow).order_by(ClientKeyRow.id))).all()

    async def revoke(self, name: str, now: float) -> bool:
        """Revoke a key; False if it was already revoked."""
        row = await self._find(name)
        if row is None:
            raise ConfigError(f"no key named {name}")
        if row.revoked_at is not None:
            return False
        row.revoked_at = now
        await self._session.flush()
        return True

    async def active_hashes(self) -> dict[str, str]:
        """SHA-256 hex → key name, for every key not revoked."""
        rows = await self._session.execute(
            select(ClientKeyRow.key_hash, ClientKeyRow.name).where(ClientKeyRow.revoked_at.is_(None))
        )
        return {key_hash: name for key_hash, name in rows}

    async def _find(self, name: str) -> ClientKeyRow | None:
        return await self._session.scalar(select(ClientKeyRow).where(ClientKeyRow.name == name))


_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))
_USAGE_TABLE = cast(Table, UsageRow.__table__)
_usage_row = operator.attrgetter(*_USAGE_FIELDS)
_CHUNK = 1000
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
        for start in range(0, len(rows), _CHUNK):
            await connection.exec_driver_sql(sql, rows[start:start + _CHUNK])

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


class HealthRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, account: str, state: str, until: float | None, reason: str | None,
                  now: float) -> None:
        self._session.add(HealthEventRow(ts=now, account=account, state=state, until=until, reason=reason))
        await self._session.flush()

    async def add_many(self, changes: Sequence[StateChange]) -> None:
        if changes:
            await self._session.execute(insert(HealthEventRow), [dataclasses.asdict(c) for c in changes])

    async def recent(self, limit: int = 50, account: str | None = None) -> Sequence[HealthEventRow]:
        """The latest events first, optionally for one account."""
        query = (select(HealthEventRow)
                 .order_by(HealthEventRow.ts.desc(), HealthEventRow.id.desc())
                 .limit(limit))
        if account is not None:
            query = query.where(HealthEventRow.account == account)
        return (await self._session.scalars(query)).all()


_SESSION_TABLE = cast(Table, SessionRow.__table__)
_SESSION_VALUES = ("account", "chat_id", "parent_id", "turns", "last_used", "expires_at")


def _session_params(binding: Binding) -> dict[str, Any]:
    return {"key": binding.key, "account": binding.account, "chat_id": binding.chat_id,
            "parent_id": binding.parent_id, "turns": binding.turns, "last_used": binding.last_used,
            "expires_at": binding.expires_at}


class SessionRepository:
    """Conversation bindings (``app.pool.sessions.Binding``), one row per key."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def load_active(self, now: float) -> list[Binding]:
        """Every binding not expired at ``now``, least recently used first."""
        rows = await self._session.scalars(
            select(SessionRow).where(SessionRow.expires_at > now).order_by(SessionRow.last_used, SessionRow.key)
        )
        return [Binding(key=r.key, account=r.account, chat_id=r.chat_id, parent_id=r.parent_id, turns=r.turns or 0,
                        last_used=r.last_used, expires_at=r.expires_at) for r in rows]

    async def upsert_many(self, bindings: Sequence[Binding]) -> None:
        """Write the bindings, creating or overwriting each key's row (one statement on SQLite and
        PostgreSQL; an update, then inserts of the missing keys, elsewhere)."""
        if not bindings:
            return
        # one row per key, the last binding given wins (PostgreSQL refuses to update a row twice in one statement)
        params = list({b.key: _session_params(b) for b in bindings}.values())
        dialect = (await self._session.connection()).dialect.name
        if dialect not in ("sqlite", "postgresql"):
            await self._update_then_insert(params)
            return
        module: Any = sqlite if dialect == "sqlite" else postgresql
        stmt = module.insert(_SESSION_TABLE)
        stmt = stmt.on_conflict_do_update(index_elements=[_SESSION_TABLE.c.key],
                                          set_={name: stmt.excluded[name] for name in _SESSION_VALUES})
        for start in range(0, len(params), _CHUNK):
            await self._session.execute(stmt, params[start:start + _CHUNK])

    async def _update_then_insert(self, params: Sequence[dict[str, Any]]) -> None:
        """The portable upsert, for dialects without ``ON CONFLICT``."""
        for start in range(0, len(params), _CHUNK):
            chunk = {p["key"]: p for p in params[start:start + _CHUNK]}
            found = set(await self._session.scalars(select(SessionRow.key).where(SessionRow.key.in_(chunk))))
            for key in found:
                await self._session.execute(
                    update(_SESSION_TABLE).where(_SESSION_TABLE.c.key == key)
                    .values({name: chunk[key][name] for name in _SESSION_VALUES})
                )
            missing = [p for key, p in chunk.items() if key not in found]
            if missing:
                await self._session.execute(insert(_SESSION_TABLE), missing)

    async def list(self, account: str | None = None, limit: int = 100) -> Sequence[SessionRow]:
        """The most recently used first, optionally of one account; expired rows included."""
        query = select(SessionRow).order_by(SessionRow.last_used.desc(), SessionRow.key).limit(limit)
        if account is not None:
            query = query.where(SessionRow.account == account)
        return (await self._session.scalars(query)).all()

    async def purge(self, now: float, older_than: float | None = None) -> int:
        """Delete the rows expired at ``now`` and, if given, those last used before ``older_than``."""
        condition = SessionRow.expires_at <= now
        if older_than is not None:
            condition = or_(condition, SessionRow.last_used < older_than)
        result = await self._session.execute(
            delete(SessionRow).where(condition).execution_options(synchronize_session=False)
        )
        return int(cast(CursorResult[Any], result).rowcount or 0)

    async def delete(self, key: str) -> bool:
        """Delete one key's row; False if there was none."""
        result = await self._session.execute(
            delete(SessionRow).where(SessionRow.key == key).execution_options(synchronize_session=False)
        )
        return bool(cast(CursorResult[Any], result).rowcount)


class IdempotencyRepository:
    """Stored answers to requests that carried an ``Idempotency-Key`` (``app.idempotency``), one row per
    scoped key."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, key: str, now: float) -> IdempotentAnswer | None:
        """The answer stored for ``key``, unless it has expired at ``now``."""
        row = await self._session.scalar(
            select(IdempotencyRow).where(IdempotencyRow.key == key, IdempotencyRow.expires_at > now))
        if row is None:
            return None
        return IdempotentAnswer(key=row.key, request_hash=row.request_hash, status=row.status, body=row.body,
                                created_at=row.created_at, expires_at=row.expires_at)

    async def put_many(self, answers: Sequence[IdempotentAnswer]) -> None:
        """Write the answers, replacing any row of the same key (an expired one not purged yet)."""
        for start in range(0, len(answers), _CHUNK):
            chunk = answers[start:start + _CHUNK]
            await self._session.execute(
                delete(IdempotencyRow).where(IdempotencyRow.key.in_([a.key for a in chunk]))
                .execution_options(synchronize_session=False))
            await self._session.execute(insert(IdempotencyRow), [dataclasses.asdict(a) for a in chunk])

    async def purge(self, now: float) -> int:
        """Delete the answers expired at ``now``."""
        result = await self._session.execute(
            delete(IdempotencyRow).where(IdempotencyRow.expires_at <= now)
            .execution_options(synchronize_session=False))
        return int(cast(CursorResult[Any], result).rowcount or 0)
