"""Repositories over a real, migrated SQLite file; the test owns every transaction."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from sqlalchemy import select

from app.accounts_config import AccountSpec, make_account_spec
from app.clock import ManualClock
from app.errors import ConfigError
from app.store.db import Database
from app.store.models import ClientKeyRow
from app.store.records import UsageRecord, UsageTotals
from app.store.repository import (
    CONFIG_DISABLED_REASON,
    AccountRepository,
    ClientKeyRepository,
    HealthRepository,
    hash_key,
)
from app.store.usage import UsageRepository

NOW = 1_760_000_000.0


def spec(name: str = "acct", **kw: object) -> AccountSpec:
    kw.setdefault("secret", "sk-test-0123456789abcdef")
    return make_account_spec(name=name, kind=kw.pop("kind", "moonshot"), **kw)  # type: ignore[arg-type]


# --- accounts -------------------------------------------------------------------------------------


async def test_add_get_and_back_to_the_same_spec(migrated: Database) -> None:
    original = spec(models=["kimi-k2.5", "moonshot-v1-8k"], rpm=60, tpm=1000, tpd=9000, concurrency=3,
                    weight=2.5, proxy="http://127.0.0.1:3128", base_url="https://example.test/v1")
    async with migrated.session() as session, session.begin():
        row = await AccountRepository(session).add(original, NOW)
        assert row.config_rev == 1 and row.state == "active" and row.created_at == row.updated_at == NOW
    async with migrated.session() as session:
        row = await AccountRepository(session).get("acct")
    assert row.models == ["kimi-k2.5", "moonshot-v1-8k"]
    assert AccountRepository.to_spec(row) == original


async def test_add_twice_and_get_missing_are_config_errors(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        repo = AccountRepository(session)
        await repo.add(spec(), NOW)
        with pytest.raises(ConfigError, match="an account named acct already exists"):
            await repo.add(spec(), NOW)
        with pytest.raises(ConfigError, match=r"^no account named nope$"):
            await repo.get("nope")


async def test_repositories_never_commit(migrated: Database) -> None:
    async with migrated.session() as session:
        await AccountRepository(session).add(spec(), NOW)
        await ClientKeyRepository(session).create("k", NOW)
        # leaving the session without commit rolls back
    async with migrated.session() as session:
        assert await AccountRepository(session).list() == []
        assert await ClientKeyRepository(session).list() == []


async def test_upsert_creates_updates_or_leaves_alone(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        repo = AccountRepository(session)
        assert await repo.upsert(spec(rpm=10), NOW) == "created"
        assert await repo.upsert(spec(rpm=10), NOW + 1) == "unchanged"
        assert (await repo.get("acct")).config_rev == 1
        assert await repo.upsert(spec(rpm=20, models=["m1"]), NOW + 2) == "updated"
        row = await repo.get("acct")
        assert (row.rpm, row.models, row.config_rev, row.updated_at) == (20, ["m1"], 2, NOW + 2)


async def test_upsert_disables_and_re_enables_what_the_file_disabled(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        repo = AccountRepository(session)
        await repo.add(spec(), NOW)
        assert await repo.upsert(spec(enabled=False), NOW) == "updated"
        row = await repo.get("acct")
        assert (row.enabled, row.disabled_reason) == (False, CONFIG_DISABLED_REASON)
        assert await repo.upsert(spec(enabled=False), NOW) == "unchanged"
        assert await repo.upsert(spec(), NOW) == "updated"
        row = await repo.get("acct")
        assert (row.enabled, row.disabled_reason, row.config_rev) == (True, None, 3)


async def test_upsert_keeps_an_operator_disable(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        repo = AccountRepository(session)
        await repo.add(spec(), NOW)
        await repo.set_enabled("acct", False, "key leaked", NOW)
        assert await repo.upsert(spec(), NOW) == "unchanged"
        assert await repo.upsert(spec(rpm=5), NOW) == "updated"
        row = await repo.get("acct")
        assert (row.enabled, row.disabled_reason, row.rpm) == (False, "key leaked", 5)


async def test_disable_and_enable_bump_the_revision_and_enable_revives(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        repo = AccountRepository(session)
        await repo.add(spec(), NOW)
        assert await repo.save_state("acct", "auth_dead", None, "401 from upstream")
        row = await repo.set_enabled("acct", False, "rotating the key", NOW + 5)
        assert (row.enabled, row.disabled_reason, row.config_rev, row.updated_at) == (
            False, "rotating the key", 2, NOW + 5)
        assert row.state == "auth_dead"  # runtime state is the server's, disabling leaves it
        row = await repo.set_enabled("acct", True, None, NOW + 6)
        assert (row.enabled, row.disabled_reason, row.config_rev) == (True, None, 3)
        assert (row.state, row.state_until, row.state_reason) == ("active", None, None)


async def test_save_state_leaves_the_revision_alone(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        repo = AccountRepository(session)
        await repo.add(spec("a"), NOW)
        await repo.add(spec("b"), NOW)
        await repo.set_enabled("b", False, None, NOW)
        assert await repo.save_state("a", "cooling_down", NOW + 30, "429") is True
        assert await repo.save_state("gone", "auth_dead", None, None) is False
        assert await repo.revisions() == {"a": 1, "b": 2}
    async with migrated.session() as session:
        row = await AccountRepository(session).get("a")
    assert (row.state, row.state_until, row.state_reason) == ("cooling_down", NOW + 30, "429")


async def test_list_in_order_and_remove(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        repo = AccountRepository(session)
        for name in ("zeta", "alpha", "mid"):
            await repo.add(spec(name), NOW)
        await repo.remove("alpha")
        with pytest.raises(ConfigError, match="no account named alpha"):
            await repo.remove("alpha")
    async with migrated.session() as session:
        assert [row.name for row in await AccountRepository(session).list()] == ["zeta", "mid"]


async def test_to_spec_keeps_extra_options(migrated: Database) -> None:
    with_extra = dataclasses.replace(spec(kind="kimi-ai-chat", secret=None), extra={"nonce_ttl": 300})
    async with migrated.session() as session, session.begin():
        repo = AccountRepository(session)
        await repo.add(with_extra, NOW)
        assert repo.to_spec(await repo.get("acct")) == with_extra
        assert await repo.upsert(with_extra, NOW) == "unchanged"


# --- client keys ----------------------------------------------------------------------------------


async def test_create_returns_the_key_once_and_stores_its_hash(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        key = await ClientKeyRepository(session).create("batch", NOW)
    assert key.startswith("kp-") and len(key) > 40
    async with migrated.session() as session:
        row = (await session.scalars(select(ClientKeyRow))).one()
    assert (row.name, row.key_hash, row.key_prefix, row.created_at, row.revoked_at) == (
        "batch", hash_key(key), key[:8], NOW, None)
    assert key not in {row.key_hash, row.key_prefix}
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()


async def test_keys_duplicate_bad_name_revoke_and_active_hashes(migrated: Database) -> None:
    clock = ManualClock(NOW)
    async with migrated.session() as session, session.begin():
        keys = ClientKeyRepository(session)
        first = await keys.create("one", clock.time())
        second = await keys.create("two", clock.time())
        with pytest.raises(ConfigError, match="a key named one already exists"):
            await keys.create("one", clock.time())
        with pytest.raises(ConfigError, match="bad key name"):
            await keys.create("has space", clock.time())
        assert await keys.active_hashes() == {hash_key(first): "one", hash_key(second): "two"}
        clock.advance(60)
        assert await keys.revoke("one", clock.time()) is True
        assert await keys.revoke("one", clock.time() + 1) is False
        with pytest.raises(ConfigError, match="no key named nope"):
            await keys.revoke("nope", clock.time())
        assert await keys.active_hashes() == {hash_key(second): "two"}
        assert [(row.name, row.revoked_at) for row in await keys.list()] == [("one", NOW + 60), ("two", None)]


# --- usage and health -----------------------------------------------------------------------------


def usage(ts: float, status: int = 200, prompt: int = 10, completion: int = 5) -> UsageRecord:
    return UsageRecord(ts=ts, request_id=f"req-{ts}", account="a", client_key="batch", model="kimi-k2.5",
                       status=status, outcome="ok" if status == 200 else "upstream_error",
                       prompt_tokens=prompt, completion_tokens=completion, latency_ms=12.5)


async def test_usage_add_many_and_totals(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        repo = UsageRepository(session)
        await repo.add_many([])
        assert await repo.totals(0) == UsageTotals()
        failed = usage(NOW + 1, status=502, prompt=7, completion=0)
        await repo.add_many([usage(NOW - 100), usage(NOW), failed])
        assert await repo.totals(NOW) == UsageTotals(requests=2, errors=1, prompt_tokens=17,
                                                     completion_tokens=5)
        assert await repo.totals(0) == UsageTotals(requests=3, errors=1, prompt_tokens=27,
                                                   completion_tokens=10)


async def test_health_events_latest_first(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        repo = HealthRepository(session)
        await repo.add("a", "cooling_down", NOW + 30, "429", NOW)
        await repo.add("b", "auth_dead", None, "401", NOW + 1)
        await repo.add("a", "active", None, None, NOW + 31)
        assert [(e.account, e.state) for e in await repo.recent(2)] == [("a", "active"), ("b", "auth_dead")]
        events = await repo.recent(account="a")
        assert [(e.state, e.until, e.reason, e.ts) for e in events] == [
            ("active", None, None, NOW + 31), ("cooling_down", NOW + 30, "429", NOW)]
