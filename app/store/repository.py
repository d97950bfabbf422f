"""Repositories: typed reads and writes over one ``AsyncSession``.

They flush (so constraint problems surface where they happen) but never commit: the caller owns
the transaction, e.g. ``async with db.session() as s, s.begin(): await AccountRepository(s).add(...)``.
Times are passed in (``now``) from the injected clock. A state's or a health event's ``reason`` is
redacted (``app.redact``) on its way in: it may quote what an upstream answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from collections.abc import Sequence
from typing import Any, Literal, cast

from sqlalchemy import CursorResult, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts_config import AccountSpec, AliasSpec, ConfigFile
from app.errors import ConfigError
from app.kimi_auth import check_fresh
from app.pool.limits import Learned
from app.redact import redact_optional
from app.store.models import (
    AccountRow,
    ClientKeyRow,
    HealthEventRow,
    IdempotencyRow,
    ModelAliasRow,
)
from app.store.records import IdempotentAnswer, StateChange

KEY_PREFIX = "kp-"
MASTER_KEY_NAME = "master"
"""The client name recorded for requests made with the master key (``app.api.auth``)."""
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UpsertResult = Literal["created", "updated", "unchanged"]
CONFIG_DISABLED_REASON = "disabled in accounts file"
CHUNK = 1000
"""Rows per statement in bulk writes."""


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
        row = AccountRow(name=spec.name, enabled=True, state="active", state_rev=0, config_rev=1,
                         created_at=now, updated_at=now)
        _apply_spec(row, spec)
        self._session.add(row)
        await self._session.flush()
        return row

    async def upsert(self, spec: AccountSpec, now: float) -> UpsertResult:
        """Make the stored account match ``spec`` (import, edit); an update bumps ``config_rev``. A new key or
        token revives the account's runtime state (a dead key replaced is alive until the upstream says
        otherwise); with a new base URL too, its models are asked again (``reaches_differently``).

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
        before = self.to_spec(row)
        if before == spec:
            return "unchanged"
        was_enabled = row.enabled
        _apply_spec(row, spec)
        new_secret = before.secret != spec.secret
        if (spec.enabled and not was_enabled) or new_secret:
            _revive(row)
        if new_secret:
            row.load_error = None  # the server judges the new credential when it loads it
        if reaches_differently(before, spec):
            row.models_checked_at = None  # ask the upstream again what it serves
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
            row.disabled_reason = redact_optional(reason)
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
            .values(state=state, state_until=until, state_reason=redact_optional(reason))
            .execution_options(synchronize_session=False)
        )
        return bool(cast(CursorResult[Any], result).rowcount)

    async def replace_state(self, name: str, expected_rev: int | None, state: str, until: float | None,
                            reason: str | None) -> bool:
        """The server's write of a runtime state, made only if the row's ``state_rev`` is still
        ``expected_rev`` (the revision the server last read or wrote; None: whatever it is), and
        bumping it. False when it is not: someone else (a probe, an enable) wrote a state since, which
        stands; or the account is gone. Leaves ``config_rev`` alone."""
        query = update(AccountRow).where(AccountRow.name == name)
        if expected_rev is not None:
            query = query.where(AccountRow.state_rev == expected_rev)
        result = await self._session.execute(
            query.values(state=state, state_until=until, state_reason=reason, state_rev=AccountRow.state_rev + 1)
            .execution_options(synchronize_session=False))
        return bool(cast(CursorResult[Any], result).rowcount)

    async def set_runtime_state(self, name: str, state: str, until: float | None, reason: str | None,
                                now: float) -> AccountRow:
        """Runtime state set by an operator's action (a probe): unlike ``save_state`` it bumps
        ``config_rev``, so a running server reloads the account and adopts the state."""
        row = await self.get(name)
        row.state, row.state_until, row.state_reason = state, until, redact_optional(reason)
        row.state_rev += 1
        _touch(row, now)
        await self._session.flush()
        return row

    async def save_learned_limits(self, name: str, learned: Learned, limits_rev: int) -> bool:
        """What the server learned of the limits, written by it; leaves ``config_rev`` alone. Nothing is written
        if ``limits_rev`` is no longer the stored one (``reset_limits`` came in between). True if written."""
        result = await self._session.execute(
            update(AccountRow)
            .where(AccountRow.name == name, AccountRow.limits_rev == limits_rev)
            .values(learned_limits=learned or None)
            .execution_options(synchronize_session=False)
        )
        return bool(cast(CursorResult[Any], result).rowcount)

    async def reset_limits(self, name: str, now: float) -> Learned:
        """Forget the limits learned of an account (an operator's ``reset-limits``): a running server, which
        may hold some it has not written yet, forgets them too when it reloads the account (``limits_rev``).
        Returns what was stored."""
        row = await self.get(name)
        forgotten = dict(row.learned_limits or {})
        row.learned_limits = None
        row.limits_rev += 1
        _touch(row, now)
        await self._session.flush()
        return forgotten

    async def set_models(self, name: str, models: Sequence[str], now: float) -> bool:
        """Store the model ids the upstream says the account serves, and when it said so; leaves ``config_rev``
        alone (a running server reloads an account whose list changed, ``app.sync``). Returns whether it did."""
        row = await self.get(name)
        models = list(dict.fromkeys(models))
        changed = row.discovered_models != models
        row.discovered_models, row.models_checked_at = models, now
        await self._session.flush()
        return changed

    async def save_load_error(self, name: str, error: str | None) -> bool:
        """Why the server could not load the account's credential (None: it could); written by the server."""
        result = await self._session.execute(
            update(AccountRow)
            .where(AccountRow.name == name)
            .values(load_error=redact_optional(error))
            .execution_options(synchronize_session=False)
        )
        return bool(cast(CursorResult[Any], result).rowcount)

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


def reaches_differently(before: AccountSpec, after: AccountSpec) -> bool:
    """Whether the account now reaches its upstream another way (key or token, base URL): its upstream is then
    asked again which models it serves."""
    return (before.secret, before.base_url) != (after.secret, after.base_url)


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
    row.state_rev += 1


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


class HealthRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, account: str, state: str, until: float | None, reason: str | None,
                  now: float) -> None:
        self._session.add(HealthEventRow(ts=now, account=account, state=state, until=until,
                                         reason=redact_optional(reason)))
        await self._session.flush()

    async def add_many(self, changes: Sequence[StateChange]) -> None:
        if changes:
            await self._session.execute(insert(HealthEventRow), [
                {**dataclasses.asdict(c), "reason": redact_optional(c.reason)} for c in changes])

    async def recent(self, limit: int = 50, account: str | None = None) -> Sequence[HealthEventRow]:
        """The latest events first, optionally for one account."""
        query = (select(HealthEventRow)
                 .order_by(HealthEventRow.ts.desc(), HealthEventRow.id.desc())
                 .limit(limit))
        if account is not None:
            query = query.where(HealthEventRow.account == account)
        return (await self._session.scalars(query)).all()


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
        for start in range(0, len(answers), CHUNK):
            chunk = answers[start:start + CHUNK]
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
