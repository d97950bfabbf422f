"""SessionRepository over a real, migrated SQLite file: upsert, load, list, purge, delete."""

from __future__ import annotations

from sqlalchemy import func, select

from app.pool.sessions import Binding
from app.store.db import Database
from app.store.models import SessionRow
from app.store.sessions import SessionRepository

NOW = 1_760_000_000.0
HOUR = 3600.0


def binding(key: str, account: str = "acct-1", *, used: float = 0.0, ttl: float = 24 * HOUR,
            chat_id: str | None = None, parent_id: str | None = None) -> Binding:
    return Binding(key=key, account=account, chat_id=chat_id, parent_id=parent_id, last_used=NOW + used,
                   expires_at=NOW + used + ttl)


async def upsert(db: Database, *bindings: Binding) -> None:
    async with db.session() as session, session.begin():
        await SessionRepository(session).upsert_many(list(bindings))


async def count(db: Database) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(SessionRow)) or 0)


async def test_upsert_creates_then_overwrites_and_load_reads_back(migrated: Database) -> None:
    await upsert(migrated, binding("a", chat_id="chat-1", parent_id="msg-1"), binding("b", used=1))
    await upsert(migrated, binding("a", "acct-2", used=2), binding("c", used=3))  # a migrated; c is new
    async with migrated.session() as session:
        loaded = await SessionRepository(session).load_active(NOW)
    assert loaded == [binding("b", used=1), binding("a", "acct-2", used=2), binding("c", used=3)]
    assert await count(migrated) == 3


async def test_upsert_of_nothing_and_of_a_repeated_key(migrated: Database) -> None:
    await upsert(migrated)
    await upsert(migrated, binding("a", used=1), binding("a", "acct-2", used=2))  # the last one wins
    async with migrated.session() as session:
        assert await SessionRepository(session).load_active(NOW) == [binding("a", "acct-2", used=2)]


async def test_load_active_leaves_out_expired_and_dropped_rows(migrated: Database) -> None:
    dropped = binding("dropped")
    dropped.expires_at = 0.0  # how SessionTable.drop announces a binding
    await upsert(migrated, binding("old", ttl=HOUR), binding("live", used=HOUR), dropped)
    async with migrated.session() as session:
        repo = SessionRepository(session)
        assert [b.key for b in await repo.load_active(NOW + HOUR - 1)] == ["old", "live"]
        assert [b.key for b in await repo.load_active(NOW + HOUR)] == ["live"]


async def test_list_is_latest_first_by_account_and_limited(migrated: Database) -> None:
    await upsert(migrated, *(binding(f"k{n}", f"acct-{n % 2}", used=n) for n in range(5)))
    async with migrated.session() as session:
        repo = SessionRepository(session)
        assert [r.key for r in await repo.list()] == ["k4", "k3", "k2", "k1", "k0"]
        assert [r.key for r in await repo.list(account="acct-1")] == ["k3", "k1"]
        assert [r.key for r in await repo.list(limit=2)] == ["k4", "k3"]
        assert await repo.list(account="nobody") == []


async def test_purge_expired_then_older_than(migrated: Database) -> None:
    await upsert(migrated, binding("expired", ttl=HOUR), binding("idle", used=2 * HOUR),
                 binding("busy", used=10 * HOUR))
    now = NOW + 11 * HOUR
    async with migrated.session() as session, session.begin():
        assert await SessionRepository(session).purge(now) == 1
    async with migrated.session() as session, session.begin():
        assert await SessionRepository(session).purge(now, older_than=now - 5 * HOUR) == 1  # idle 9 h
    async with migrated.session() as session:
        assert [r.key for r in await SessionRepository(session).list()] == ["busy"]


async def test_delete_and_never_commit(migrated: Database) -> None:
    await upsert(migrated, binding("a"))
    async with migrated.session() as session:
        repo = SessionRepository(session)
        assert await repo.delete("a") is True
        assert await repo.delete("a") is False
        await repo.upsert_many([binding("b")])
        await session.rollback()  # the caller owns the transaction
    assert await count(migrated) == 1


async def test_the_portable_upsert_for_dialects_without_on_conflict(migrated: Database) -> None:
    """What upsert_many does on a database other than SQLite and PostgreSQL, run here on SQLite."""
    await upsert(migrated, binding("a"))
    async with migrated.session() as session, session.begin():
        await SessionRepository(session)._update_then_insert(
            [{"key": b.key, "account": b.account, "chat_id": b.chat_id, "parent_id": b.parent_id, "turns": b.turns,
              "last_used": b.last_used, "expires_at": b.expires_at, "client_key": b.client}
             for b in (binding("a", "acct-2", used=1, chat_id="c"), binding("b", used=2))])
    async with migrated.session() as session:
        assert await SessionRepository(session).load_active(NOW) == [
            binding("a", "acct-2", used=1, chat_id="c"), binding("b", used=2)]
