"""Files and batch jobs: the rows behind the OpenAI Files and Batch APIs, and a batch's items.

Like every repository these flush but never commit: the caller owns the transaction. An ``owner``
scopes what a caller sees: a client key's name sees the rows it made, the master key
(``MASTER_KEY_NAME``) every row, and None (an open gateway) the rows made without a key. A file
past its ``expires_at`` is gone for the reads that are given ``now``, before ``purge_expired``
deletes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.store.models import BatchItemRow, BatchRow, FileRow
from app.store.repository import MASTER_KEY_NAME

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
"""Statuses of a batch the runner still works on."""
TERMINAL = ("completed", "failed", "expired", "cancelled")
_ITEMS = cast(Table, BatchItemRow.__table__)
_CHUNK = 1000


def _owned(column: InstrumentedAttribute[str | None], owner: str | None) -> ColumnElement[bool]:
    if owner == MASTER_KEY_NAME:
        return true()
    return column.is_(None) if owner is None else column == owner


def _live(now: float | None) -> ColumnElement[bool]:
    """Files not expired at ``now`` (every file when ``now`` is None)."""
    if now is None:
        return true()
    return or_(FileRow.expires_at.is_(None), FileRow.expires_at > now)


def _after(created: InstrumentedAttribute[float], ident: InstrumentedAttribute[str], at: float, after: str,
           descending: bool) -> ColumnElement[bool]:
    """Rows past the cursor row (``at``, ``after``) in (created_at, id) order."""
    if descending:
        return or_(created < at, and_(created == at, ident < after))
    return or_(created > at, and_(created == at, ident > after))


class FileRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, file_id: str, *, purpose: str, filename: str, content: bytes, owner: str | None,
                  now: float, expires_at: float | None = None) -> FileRow:
        row = FileRow(id=file_id, purpose=purpose, filename=filename, size=len(content), content=content,
                      created_at=now, client_key=owner, expires_at=expires_at)
        self._session.add(row)
        await self._session.flush()
        return row

    async def get(self, file_id: str, owner: str | None, now: float | None = None) -> FileRow | None:
        return await self._session.scalar(
            select(FileRow).where(FileRow.id == file_id, _owned(FileRow.client_key, owner), _live(now)))

    async def held(self, owner: str | None, now: float) -> tuple[int, int]:
        """How many files, and bytes, ``owner`` itself keeps (not expired at ``now``); the master key
        counts its own files only."""
        who = FileRow.client_key.is_(None) if owner is None else FileRow.client_key == owner
        count, size = (await self._session.execute(
            select(func.count(), func.coalesce(func.sum(FileRow.size), 0)).where(who, _live(now)))).one()
        return int(count), int(size)

    async def purge_expired(self, now: float) -> int:
        """Delete the files expired at ``now``; how many there were."""
        result = await self._session.execute(
            delete(FileRow).where(FileRow.expires_at <= now).execution_options(synchronize_session=False))
        return int(cast(CursorResult[Any], result).rowcount or 0)

    async def next_expiry(self) -> float | None:
        """When the next file expires (None: none will)."""
        return await self._session.scalar(select(func.min(FileRow.expires_at)))

    async def content(self, file_id: str) -> bytes | None:
        return await self._session.scalar(select(FileRow.content).where(FileRow.id == file_id))

    async def page(self, owner: str | None, *, limit: int, after: str | None = None, purpose: str | None = None,
                   descending: bool = True, now: float | None = None) -> tuple[list[FileRow], bool]:
        """Up to ``limit`` files after the file ``after``, newest first (or oldest); whether more follow."""
        query = select(FileRow).where(_owned(FileRow.client_key, owner), _live(now))
        if purpose is not None:
            query = query.where(FileRow.purpose == purpose)
        if after is not None:
            cursor = await self.get(after, owner)
            if cursor is None:
                return [], False
            query = query.where(_after(FileRow.created_at, FileRow.id, cursor.created_at, cursor.id, descending))
        order = (FileRow.created_at.desc(), FileRow.id.desc()) if descending else (FileRow.created_at, FileRow.id)
        rows = list((await self._session.scalars(query.order_by(*order).limit(limit + 1))).all())
        return rows[:limit], len(rows) > limit

    async def delete(self, file_id: str) -> bool:
        result = await self._session.execute(
            delete(FileRow).where(FileRow.id == file_id).execution_options(synchronize_session=False))
        return bool(cast(CursorResult[Any], result).rowcount)


@dataclass(frozen=True, slots=True)
class PendingItem:
    """A request of a batch that has no stored result yet."""

    line: int
    custom_id: str
    body: dict[str, Any]
    attempts: int
    retry_at: float | None


@dataclass(frozen=True, slots=True)
class ItemResult:
    """What became of one attempt at an item: ``done`` or ``failed`` with its result line, or
    ``pending`` again, to be tried at ``retry_at``."""

    batch_id: str
    line: int
    state: str
    attempts: int
    result: dict[str, Any] | None = None
    retry_at: float | None = None


_SAVE = (update(_ITEMS)
         .where(_ITEMS.c.batch_id == bindparam("k_batch"), _ITEMS.c.line == bindparam("k_line"))
         .values(state=bindparam("v_state"), result=bindparam("v_result", type_=_ITEMS.c.result.type),
                 attempts=bindparam("v_attempts"), retry_at=bindparam("v_retry_at"),
                 updated_at=bindparam("v_updated_at")))


class BatchRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    # --- batches ----------------------------------------------------------------------------------

    async def add(self, row: BatchRow) -> BatchRow:
        self._session.add(row)
        await self._session.flush()
        return row

    async def get(self, batch_id: str, owner: str | None = MASTER_KEY_NAME) -> BatchRow | None:
        return await self._session.scalar(
            select(BatchRow).where(BatchRow.id == batch_id, _owned(BatchRow.client_key, owner)))

    async def page(self, owner: str | None, *, limit: int, after: str | None = None) -> tuple[list[BatchRow], bool]:
        """Up to ``limit`` batches after the batch ``after``, newest first; whether more follow."""
        query = select(BatchRow).where(_owned(BatchRow.client_key, owner))
        if after is not None:
            cursor = await self.get(after, owner)
            if cursor is None:
                return [], False
            query = query.where(_after(BatchRow.created_at, BatchRow.id, cursor.created_at, cursor.id, True))
        rows = list((await self._session.scalars(
            query.order_by(BatchRow.created_at.desc(), BatchRow.id.desc()).limit(limit + 1))).all())
        return rows[:limit], len(rows) > limit

    async def output_expiry(self, batch_id: str) -> float | None:
        """The batch's ``output_expires_after`` (seconds; None: the default)."""
        return await self._session.scalar(select(BatchRow.output_expires_after).where(BatchRow.id == batch_id))

    async def active(self) -> list[BatchRow]:
        """The batches still being worked on, oldest first."""
        return list((await self._session.scalars(
            select(BatchRow).where(BatchRow.status.in_(ACTIVE)).order_by(BatchRow.created_at, BatchRow.id))).all())

    async def move(self, batch_id: str, status: str, now: float, *, expect: Iterable[str],
                   **values: Any) -> bool:
        """Set the batch's status (and its ``<status>_at``, and ``values``) if its status is one of
        ``expect``; False if it is not (someone moved it first)."""
        result = await self._session.execute(
            update(BatchRow).where(BatchRow.id == batch_id, BatchRow.status.in_(tuple(expect)))
            .values(status=status, **{f"{status}_at": now}, **values)
            .execution_options(synchronize_session=False))
        return bool(cast(CursorResult[Any], result).rowcount)

    # --- items ------------------------------------------------------------------------------------

    async def add_items(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert item rows (dicts of ``BatchItemRow`` columns), in chunks."""
        for start in range(0, len(rows), _CHUNK):
            await self._session.execute(insert(_ITEMS), list(rows[start:start + _CHUNK]))

    async def delete_items(self, batch_id: str) -> None:
        await self._session.execute(
            delete(BatchItemRow).where(BatchItemRow.batch_id == batch_id).execution_options(synchronize_session=False))

    async def pending(self, batch_id: str, *, after_line: int, limit: int) -> list[PendingItem]:
        """Up to ``limit`` pending items after line ``after_line``, in line order."""
        rows = await self._session.execute(
            select(BatchItemRow.line, BatchItemRow.custom_id, BatchItemRow.body, BatchItemRow.attempts,
                   BatchItemRow.retry_at)
            .where(BatchItemRow.batch_id == batch_id, BatchItemRow.state == "pending", BatchItemRow.line > after_line)
            .order_by(BatchItemRow.line).limit(limit))
        return [PendingItem(*row) for row in rows]

    async def pending_lines(self, batch_id: str, lines: Iterable[int]) -> list[PendingItem]:
        """The items of ``lines`` that are still pending, in line order."""
        wanted = sorted(set(lines))
        found: list[PendingItem] = []
        for start in range(0, len(wanted), _CHUNK):
            rows = await self._session.execute(
                select(BatchItemRow.line, BatchItemRow.custom_id, BatchItemRow.body, BatchItemRow.attempts,
                       BatchItemRow.retry_at)
                .where(BatchItemRow.batch_id == batch_id, BatchItemRow.state == "pending",
                       BatchItemRow.line.in_(wanted[start:start + _CHUNK]))
                .order_by(BatchItemRow.line))
            found += [PendingItem(*row) for row in rows]
        return found

    async def count_pending(self, batch_id: str) -> int:
        return int(await self._session.scalar(
            select(func.count()).where(BatchItemRow.batch_id == batch_id, BatchItemRow.state == "pending")) or 0)

    async def save_results(self, results: Sequence[ItemResult], now: float) -> None:
        """Store what became of items, and count the finished ones in their batches."""
        if not results:
            return
        await self._session.execute(_SAVE, [
            {"k_batch": r.batch_id, "k_line": r.line, "v_state": r.state, "v_result": r.result,
             "v_attempts": r.attempts, "v_retry_at": r.retry_at, "v_updated_at": now} for r in results])
        counts: dict[str, list[int]] = {}
        for r in results:
            if r.state != "pending":
                pair = counts.setdefault(r.batch_id, [0, 0])
                pair[r.state != "done"] += 1
        for batch_id, (completed, failed) in counts.items():
            await self._count(batch_id, completed, failed)

    async def settle_pending(self, batch_id: str, line_for: Callable[[str], dict[str, Any]], now: float) -> int:
        """Fail every pending item with the error line ``line_for(custom_id)`` (an expired or cancelled
        batch's requests that never ran); how many there were."""
        settled = 0
        while True:
            rows = (await self._session.execute(
                select(BatchItemRow.line, BatchItemRow.custom_id, BatchItemRow.attempts)
                .where(BatchItemRow.batch_id == batch_id, BatchItemRow.state == "pending")
                .order_by(BatchItemRow.line).limit(_CHUNK))).all()
            if not rows:
                break
            await self._session.execute(_SAVE, [
                {"k_batch": batch_id, "k_line": line, "v_state": "failed", "v_result": line_for(custom_id or ""),
                 "v_attempts": attempts, "v_retry_at": None, "v_updated_at": now}
                for line, custom_id, attempts in rows])
            settled += len(rows)
        if settled:
            await self._count(batch_id, 0, settled)
        return settled

    async def results(self, batch_id: str, state: str, *, after_line: int, limit: int) -> list[tuple[int, Any]]:
        """(line, result line) of up to ``limit`` items in ``state`` after ``after_line``, in line order."""
        rows = await self._session.execute(
            select(BatchItemRow.line, BatchItemRow.result)
            .where(BatchItemRow.batch_id == batch_id, BatchItemRow.state == state, BatchItemRow.line > after_line)
            .order_by(BatchItemRow.line).limit(limit))
        return [(line, result) for line, result in rows]

    async def _count(self, batch_id: str, completed: int, failed: int) -> None:
        await self._session.execute(
            update(BatchRow).where(BatchRow.id == batch_id)
            .values(completed=BatchRow.completed + completed, failed=BatchRow.failed + failed)
            .execution_options(synchronize_session=False))
