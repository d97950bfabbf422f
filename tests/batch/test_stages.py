"""Opening and closing a batch on their own, on a real SQLite file: repeatable, and undone when a cancel
got there first."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.batch.stages import close_batch, open_batch
from app.store.batches import BatchRepository, FileRepository
from app.store.db import Database
from app.store.models import BatchRow
from tests.batch.support import jsonl, request_line

T0 = 1_760_000_000.0
MODELS = frozenset({"kimi-k2-0905-preview"})


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db")
    await database.upgrade()
    async with database.session() as session, session.begin():
        await FileRepository(session).add("file-in", purpose="batch", filename="in.jsonl", owner=None, now=T0,
                                          content=jsonl([request_line("a"), request_line("b"), b"oops"]))
        await BatchRepository(session).add(BatchRow(
            id="batch_1", status="validating", endpoint="/v1/chat/completions", completion_window="1h",
            input_file_id="file-in", total=0, completed=0, failed=0, created_at=T0, expires_at=T0 + 3600))
    yield database
    await database.dispose()


async def states(db: Database) -> tuple[str, int, int, int, int]:
    async with db.session() as session:
        row = await BatchRepository(session).get("batch_1")
        assert row is not None
        return row.status, row.total, row.completed, row.failed, await BatchRepository(session).count_pending("batch_1")


async def open_(db: Database) -> str | None:
    return (await open_batch(db, "batch_1", input_file_id="file-in", endpoint="/v1/chat/completions",
                             models=MODELS, now=T0 + 1)).status


async def test_opening_again_after_a_crash_replaces_what_the_first_opening_left(db: Database) -> None:
    async with db.session() as session, session.begin():  # a first opening, cut short after its inserts
        await BatchRepository(session).add_items([{"batch_id": "batch_1", "line": 1, "custom_id": "a", "body": {},
                                                   "state": "pending", "result": None, "attempts": 0,
                                                   "retry_at": None, "updated_at": T0}])
    assert await open_(db) == "in_progress"
    assert await states(db) == ("in_progress", 3, 0, 1, 2)


async def test_an_opening_beaten_by_a_cancel_leaves_no_items(db: Database) -> None:
    async with db.session() as session, session.begin():
        await BatchRepository(session).move("batch_1", "cancelling", T0, expect=("validating",))
    assert await open_(db) is None
    assert await states(db) == ("cancelling", 0, 0, 0, 0)
    outcome = await close_batch(db, "batch_1", status="cancelling", owner=None, expires_at=T0 + 3600, now=T0 + 2)
    assert outcome is not None and outcome.status == "cancelled"


async def test_closing_waits_for_pending_requests_unless_the_batch_stopped(db: Database) -> None:
    assert await open_(db) == "in_progress"
    assert await close_batch(db, "batch_1", status="in_progress", owner=None, expires_at=T0 + 3600, now=T0) is None
    outcome = await close_batch(db, "batch_1", status="in_progress", owner=None, expires_at=T0 + 3600,
                                now=T0 + 3600)
    assert outcome is not None and (outcome.status, outcome.detail) == ("expired", "0 of 3 completed, 3 failed")
    assert await states(db) == ("expired", 3, 0, 3, 0)
    async with db.session() as session:
        row = await BatchRepository(session).get("batch_1")
        assert row is not None and row.output_file_id is None and row.error_file_id is not None
        errors = await FileRepository(session).content(row.error_file_id)
    assert errors is not None and [b"invalid_json_line" in line or b"batch_expired" in line
                                   for line in errors.splitlines()] == [True] * 3
    again = await close_batch(db, "batch_1", status="in_progress", owner=None, expires_at=T0 + 3600, now=T0 + 3601)
    assert again is not None and again.status is None, "a batch already closed is left alone"
