"""Write-behind: synchronous puts, batched flushes on the (manual) clock, nothing lost on failure."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable
from pathlib import Path

import pytest
from sqlalchemy import select

from app.clock import ManualClock
from app.pool.sessions import Binding, SessionTable
from app.store.db import Database
from app.store.models import UsageRow
from app.store.records import IdempotentAnswer, UsageRecord
from app.store.repository import IdempotencyRepository
from app.store.sessions import SessionRepository
from app.store.writer import WriteBehind

NOW = 1_760_000_000.0


def record(n: int) -> UsageRecord:
    return UsageRecord(ts=NOW + n, request_id=f"req-{n}", account="a", client_key="k", model="kimi-k2.5",
                       status=200, outcome="ok", stream=True, prompt_tokens=n, completion_tokens=1,
                       latency_ms=3.5, attempts=2)


async def usage_ids(db: Database) -> list[str]:
    async with db.session() as session:
        return list(await session.scalars(select(UsageRow.request_id).order_by(UsageRow.id)))


async def settle(waiting: Awaitable[None]) -> None:
    """Await an event-driven wait; the timeout is only a safety net, so a bug fails instead of hanging."""
    async with asyncio.timeout(5):
        await waiting


def test_puts_are_plain_synchronous_calls(migrated: Database) -> None:
    writer = WriteBehind(migrated, clock=ManualClock(NOW))
    assert not inspect.iscoroutinefunction(writer.put_usage)
    assert not inspect.iscoroutinefunction(writer.put_session)
    assert writer.put_usage(record(1)) is None  # no event loop needed: nothing is awaited
    assert writer.pending == 1


async def test_flush_writes_everything_in_order(migrated: Database) -> None:
    writer = WriteBehind(migrated, clock=ManualClock(NOW))
    for n in range(5):
        writer.put_usage(record(n))
    assert await usage_ids(migrated) == []  # nothing reached the database yet
    await writer.flush()
    assert (writer.pending, writer.flushes, writer.failures) == (0, 1, 0)
    assert await usage_ids(migrated) == [f"req-{n}" for n in range(5)]
    async with migrated.session() as session:
        row = (await session.scalars(select(UsageRow).limit(1))).one()
    assert (row.stream, row.prompt_tokens, row.latency_ms, row.attempts, row.client_key) == (
        True, 0, 3.5, 2, "k")
    await writer.flush()  # nothing queued: a no-op, not counted
    assert len(await usage_ids(migrated)) == 5
    assert writer.flushes == 1
    await settle(writer.wait_flushes(1))  # already reached: returns at once


async def test_background_task_flushes_on_the_clock_and_close_flushes_the_rest(migrated: Database) -> None:
    clock = ManualClock(NOW)
    writer = WriteBehind(migrated, clock=clock, interval=1.0)
    writer.start()
    try:
        writer.put_usage(record(1))
        await settle(clock.wait_for_sleepers(1))
        assert clock.sleepers == 1
        assert await usage_ids(migrated) == []
        clock.advance(1.0)
        await settle(writer.wait_flushes(1))
        assert await usage_ids(migrated) == ["req-1"]
        writer.put_usage(record(2))  # queued, no tick yet
    finally:
        await writer.close()
    assert await usage_ids(migrated) == ["req-1", "req-2"]
    assert (writer.flushes, writer.failures) == (2, 0)  # the tick's flush, then close()'s
    assert clock.sleepers == 0


async def test_a_full_batch_flushes_without_waiting_for_the_tick(migrated: Database) -> None:
    clock = ManualClock(NOW)
    writer = WriteBehind(migrated, clock=clock, interval=3600, max_batch=3)
    writer.start()
    try:
        for n in range(3):
            writer.put_usage(record(n))
        await settle(writer.wait_flushes(1))  # the clock never moved
        assert await usage_ids(migrated) == ["req-0", "req-1", "req-2"]
    finally:
        await writer.close()


async def test_a_failed_flush_keeps_the_records_for_the_next_try(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/not-migrated-yet.db")  # no tables: writes fail
    try:
        writer = WriteBehind(db, clock=ManualClock(NOW))
        writer.put_usage(record(1))
        with pytest.raises(Exception, match="no such table"):
            await writer.flush()
        assert (writer.flushes, writer.failures) == (0, 1)
        await settle(writer.wait_failures(1))
        writer.put_usage(record(2))
        assert writer.pending == 2
        await db.upgrade()
        await writer.flush()
        assert (writer.flushes, writer.failures) == (1, 1)
        assert await usage_ids(db) == ["req-1", "req-2"]
    finally:
        await db.dispose()


async def test_background_failures_are_logged_and_retried(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/later.db")
    clock = ManualClock(NOW)
    writer = WriteBehind(db, clock=clock, interval=1.0)
    writer.start()
    try:
        writer.put_usage(record(1))
        with caplog.at_level(logging.WARNING, logger="app.store.writer"):
            await settle(clock.wait_for_sleepers(1))
            clock.advance(1.0)
            await settle(writer.wait_failures(1))  # counted after the warning is logged
        assert "will retry" in caplog.text
        assert "no such table" in caplog.text and writer.pending == 1
        assert "req-1" not in caplog.text  # bound values (which may be secrets) are never logged
        await db.upgrade()
        await settle(clock.wait_for_sleepers(1))  # the retry waits for the next tick
        assert clock.sleepers == 1 and writer.flushes == 0
        clock.advance(1.0)
        await settle(writer.wait_flushes(1))
        assert await usage_ids(db) == ["req-1"]
        assert (writer.failures, writer.pending) == (1, 0)
    finally:
        await writer.close()
        await db.dispose()


async def test_buffer_is_bounded_and_drops_the_oldest(migrated: Database,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    writer = WriteBehind(migrated, clock=ManualClock(NOW), max_batch=2, max_buffer=5)
    for n in range(8):
        writer.put_usage(record(n))
    assert writer.pending == 5
    with caplog.at_level(logging.WARNING, logger="app.store.writer"):
        await writer.flush()
    assert "dropped the 3 oldest" in caplog.text
    assert await usage_ids(migrated) == [f"req-{n}" for n in range(3, 8)]


async def test_close_without_start_still_flushes(migrated: Database) -> None:
    writer = WriteBehind(migrated, clock=ManualClock(NOW))
    writer.put_usage(record(7))
    await writer.close()
    assert await usage_ids(migrated) == ["req-7"]


async def stored_sessions(db: Database) -> list[Binding]:
    async with db.session() as session:
        return await SessionRepository(session).load_active(NOW)


async def test_sessions_latest_per_key_wins_in_the_same_flush(migrated: Database) -> None:
    clock = ManualClock(NOW)
    writer = WriteBehind(migrated, clock=clock)
    sessions = SessionTable(ttl=3600)
    sessions.on_change(writer.put_session)
    binding = sessions.bind("k", "web-1", NOW)
    sessions.set_upstream(binding, "chat-1", "msg-1", NOW)
    sessions.bind("other", "web-2", NOW)
    writer.put_usage(record(1))
    assert writer.pending == 3  # one usage record, two session keys
    clock.advance(1)
    sessions.bind("k", "web-2", clock.time())  # migrated before the flush: only this is written
    binding.parent_id = "changed-after-the-put"  # the writer keeps what was put, not the live object
    await writer.flush()
    assert (writer.pending, writer.flushes) == (0, 1)
    assert await usage_ids(migrated) == ["req-1"]
    assert await stored_sessions(migrated) == [
        Binding(key="other", account="web-2", last_used=NOW, expires_at=NOW + 3600),
        Binding(key="k", account="web-2", last_used=NOW + 1, expires_at=NOW + 3601),
    ]
    sessions.drop("other")
    await writer.flush()
    assert [b.key for b in await stored_sessions(migrated)] == ["k"]


async def test_sessions_of_a_failed_flush_are_kept_unless_put_again(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/not-migrated-yet.db")
    try:
        writer = WriteBehind(db, clock=ManualClock(NOW))
        writer.put_session(Binding(key="a", account="old", last_used=NOW, expires_at=NOW + 60))
        writer.put_session(Binding(key="b", account="acct", last_used=NOW, expires_at=NOW + 60))
        with pytest.raises(Exception, match="no such table"):
            await writer.flush()
        writer.put_session(Binding(key="a", account="new", last_used=NOW + 1, expires_at=NOW + 61))
        assert writer.pending == 2
        await db.upgrade()
        await writer.flush()
        assert [(b.key, b.account) for b in await stored_sessions(db)] == [("b", "acct"), ("a", "new")]
    finally:
        await db.dispose()


async def test_an_idempotent_answer_can_be_read_back_until_it_is_in_the_database(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/later.db")  # no tables yet: the first flush fails
    writer = WriteBehind(db, clock=ManualClock(NOW))
    answer = IdempotentAnswer(key="master:k-1", request_hash="ab" * 32, status=200, body=b'{"id": "c-1"}',
                              created_at=NOW, expires_at=NOW + 86400)
    expired = IdempotentAnswer(key="master:k-0", request_hash="cd" * 32, status=200, body=b'{"id": "c-0"}',
                               created_at=NOW - 86400, expires_at=NOW)
    try:
        writer.put_idempotent(answer)
        writer.put_idempotent(expired)
        with pytest.raises(Exception, match="no such table"):
            await writer.flush()
        assert writer.idempotent("master:k-1") == answer and writer.pending == 2  # kept for the next flush
        await db.upgrade()
        await writer.flush()
        assert writer.idempotent("master:k-1") is None and writer.pending == 0
        async with db.session() as session:
            stored = IdempotencyRepository(session)
            assert await stored.get("master:k-1", NOW) == answer
            assert await stored.get("master:k-0", NOW - 1) is None  # purged by the flush that wrote k-1
    finally:
        await db.dispose()
