"""Files and batches in the database: who sees what, pages, conditional moves, results and their counts."""

from __future__ import annotations

from app.store.batches import BatchRepository, FileRepository, ItemResult
from app.store.db import Database
from app.store.models import BatchRow

T0 = 1_760_000_000.0


def batch(batch_id: str, owner: str | None, created: float = T0, status: str = "in_progress") -> BatchRow:
    return BatchRow(id=batch_id, status=status, endpoint="/v1/chat/completions", completion_window="24h",
                    input_file_id="file-x", client_key=owner, total=0, completed=0, failed=0, created_at=created,
                    expires_at=created + 86400)


def item(batch_id: str, line: int, state: str = "pending") -> dict[str, object]:
    return {"batch_id": batch_id, "line": line, "custom_id": f"c{line}", "body": {"n": line}, "state": state,
            "result": None, "attempts": 0, "retry_at": None, "updated_at": T0}


async def test_a_key_sees_its_own_files_the_master_key_all_and_an_open_gateway_those_without_a_key(
        migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        files = FileRepository(session)
        for name, owner in (("file-a", "alice"), ("file-b", "bob"), ("file-o", None)):
            await files.add(name, purpose="batch", filename=f"{name}.jsonl", content=b"{}", owner=owner, now=T0)
    async with migrated.session() as session:
        files = FileRepository(session)
        assert await files.get("file-a", "alice") is not None and await files.get("file-a", "bob") is None
        assert await files.get("file-o", None) is not None and await files.get("file-a", None) is None
        assert {row.id for row in (await files.page("master", limit=10))[0]} == {"file-a", "file-b", "file-o"}
        assert await files.content("file-a") == b"{}"


async def test_pages_go_newest_first_and_continue_after_a_cursor(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        batches = BatchRepository(session)
        for i in range(5):
            await batches.add(batch(f"batch_{i}", "alice", T0 + i))
        await batches.add(batch("batch_same_time", "alice", T0 + 4))
    async with migrated.session() as session:
        batches = BatchRepository(session)
        rows, more = await batches.page("alice", limit=3)
        assert [r.id for r in rows] == ["batch_same_time", "batch_4", "batch_3"] and more
        rows, more = await batches.page("alice", limit=3, after="batch_3")
        assert [r.id for r in rows] == ["batch_2", "batch_1", "batch_0"] and not more
        assert await batches.page("bob", limit=3, after="batch_3") == ([], False), "another key's cursor is unknown"


async def test_a_move_happens_only_from_an_expected_status_and_stamps_its_time(migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        batches = BatchRepository(session)
        await batches.add(batch("batch_1", None, status="validating"))
        assert await batches.move("batch_1", "cancelling", T0 + 5, expect=("validating", "in_progress"))
        assert not await batches.move("batch_1", "in_progress", T0 + 6, expect=("validating",))
    async with migrated.session() as session:
        row = await BatchRepository(session).get("batch_1")
        assert row is not None and (row.status, row.cancelling_at, row.in_progress_at) == ("cancelling", T0 + 5, None)
        assert [r.id for r in await BatchRepository(session).active()] == ["batch_1"]


async def test_results_are_stored_with_the_counts_and_pending_items_are_read_in_line_order(
        migrated: Database) -> None:
    async with migrated.session() as session, session.begin():
        batches = BatchRepository(session)
        await batches.add(batch("batch_1", None))
        await batches.add_items([item("batch_1", n) for n in range(1, 7)])
        await batches.save_results([
            ItemResult("batch_1", 2, "done", 1, {"ok": 2}), ItemResult("batch_1", 3, "failed", 1, {"bad": 3}),
            ItemResult("batch_1", 4, "pending", 1, retry_at=T0 + 8)], T0 + 1)
    async with migrated.session() as session, session.begin():
        batches = BatchRepository(session)
        pending = await batches.pending("batch_1", after_line=1, limit=2)
        assert [(p.line, p.attempts, p.retry_at) for p in pending] == [(4, 1, T0 + 8), (5, 0, None)]
        assert [p.line for p in await batches.pending_lines("batch_1", [6, 2, 1])] == [1, 6]
        assert await batches.count_pending("batch_1") == 4
        assert await batches.settle_pending("batch_1", lambda custom_id: {"expired": custom_id}, T0 + 2) == 4
        assert await batches.results("batch_1", "failed", after_line=0, limit=10) == [
            (1, {"expired": "c1"}), (3, {"bad": 3}), (4, {"expired": "c4"}), (5, {"expired": "c5"}),
            (6, {"expired": "c6"})]
        row = await batches.get("batch_1")
        assert row is not None
        await session.refresh(row)
        assert (row.completed, row.failed) == (1, 5)
