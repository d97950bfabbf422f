"""The two ends of a batch's life, as the runner goes through them: ``open_batch`` reads its input
file into items (``validating`` → ``in_progress`` or ``failed``); ``close_batch`` writes its output
and error files (→ ``completed``, ``cancelled`` or ``expired``).

Both are safe to repeat after a crash: opening starts by removing items a cut-short opening left,
and the files and the final status of a closing are one transaction. Each moves the batch only from
the status it expects; when someone moved it first (a cancel), the change is undone and the answer
says so (``Outcome(None)``), for the runner to look again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from app.batch.expiry import DEFAULT_EXPIRY
from app.batch.input import InputLine, parse_input
from app.batch.lines import error_line, jsonl, new_id
from app.errors import InvalidRequest
from app.store.batches import BatchRepository, FileRepository
from app.store.db import Database

OUTPUT_PURPOSE = "batch_output"
MAX_LISTED_ERRORS = 100
"""A failed batch lists at most this many refused lines in its ``errors``."""
_INSERT_CHUNK = 5000
_READ_CHUNK = 1000
STOPS = {"cancelling": ("cancelled", "batch_cancelled", "The batch was cancelled before this request was sent."),
         "expired": ("expired", "batch_expired", "The batch expired (its completion window ended) before this "
                                                 "request was sent.")}
"""Why a batch stopped early → its final status, and the code and message of the requests it never sent."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str | None
    """The batch's new status; None: it had been moved by someone else, nothing was changed."""
    detail: str = ""


class _Moved(Exception):
    """The batch's status changed under our feet: roll back."""


async def open_batch(db: Database, batch_id: str, *, input_file_id: str, endpoint: str, models: Collection[str],
                     now: float) -> Outcome:
    """Read the input file: its lines become items (refused ones failed at once, with their error
    line), and the batch goes ``in_progress``; or ``failed``, with ``errors``, when the file is gone,
    not UTF-8 text, or holds no valid request."""
    async with db.session() as session:
        content = await FileRepository(session).content(input_file_id)
    if content is None:
        return await _fail(db, batch_id, now, [{"code": "file_not_found", "message": f"The input file "
                                                f"{input_file_id} no longer exists.", "param": "input_file_id"}])
    try:
        lines = await asyncio.to_thread(parse_input, content, endpoint=endpoint, models=frozenset(models))
    except InvalidRequest as exc:
        return await _fail(db, batch_id, now, [{"code": exc.code, "message": exc.message}])
    refused = [line for line in lines if not line.ok]
    if len(refused) == len(lines):
        why = ({"code": "empty_file", "message": "The input file has no request lines."} if not lines else
               {"code": "no_valid_requests", "message": "No line of the input file is a valid request."})
        return await _fail(db, batch_id, now, [why, *(line.error() for line in refused[:MAX_LISTED_ERRORS])])
    rows = await asyncio.to_thread(_item_rows, batch_id, lines, now)
    async with db.session() as session, session.begin():
        await BatchRepository(session).delete_items(batch_id)  # what an opening cut short by a crash left
    for start in range(0, len(rows), _INSERT_CHUNK):  # short transactions: the database stays writable
        async with db.session() as session, session.begin():
            await BatchRepository(session).add_items(rows[start:start + _INSERT_CHUNK])
    async with db.session() as session, session.begin():
        batches = BatchRepository(session)
        if not await batches.move(batch_id, "in_progress", now, expect=("validating",), total=len(lines),
                                  failed=len(refused)):
            await batches.delete_items(batch_id)  # cancelled meanwhile: it ends with no items
            return Outcome(None)
    return Outcome("in_progress", f"{len(lines)} request(s), {len(refused)} line(s) refused")


async def _fail(db: Database, batch_id: str, now: float, errors: list[dict[str, Any]]) -> Outcome:
    errors = [{"code": None, "message": None, "param": None, "line": None, **error} for error in errors]
    async with db.session() as session, session.begin():
        if not await BatchRepository(session).move(batch_id, "failed", now, expect=("validating",), errors=errors):
            return Outcome(None)
    return Outcome("failed", str(errors[0]["message"]))


def _item_rows(batch_id: str, lines: list[InputLine], now: float) -> list[dict[str, Any]]:
    return [{"batch_id": batch_id, "line": line.line, "custom_id": line.custom_id, "body": line.body,
             "state": "pending" if line.ok else "failed",
             "result": None if line.ok else error_line(line.custom_id, line.code or "invalid_request",
                                                        line.message or ""),
             "attempts": 0, "retry_at": None, "updated_at": now} for line in lines]


async def close_batch(db: Database, batch_id: str, *, status: str, owner: str | None, expires_at: float,
                      now: float) -> Outcome | None:
    """Finish a batch with nothing in flight: ``cancelling`` becomes ``cancelled``; one past its
    expiry with requests never sent, ``expired`` (those requests fail with ``batch_cancelled`` /
    ``batch_expired``); one with every result stored goes ``finalizing``, then ``completed``. The
    output and error files are written with the final status, to expire as the batch's
    ``output_expires_after`` says (30 days by default). None: the batch still has pending
    requests and may go on (``status`` is ``in_progress``, before its expiry)."""
    async with db.session() as session:
        pending = await BatchRepository(session).count_pending(batch_id)
    if status == "cancelling":
        stop: str | None = "cancelling"
    elif pending and status == "in_progress" and now >= expires_at:
        stop = "expired"
    elif pending:
        return None
    else:
        stop = None
    if stop is None and status == "in_progress":
        async with db.session() as session, session.begin():
            if not await BatchRepository(session).move(batch_id, "finalizing", now, expect=("in_progress",)):
                return Outcome(None)
        status = "finalizing"
    final, code, message = STOPS[stop] if stop else ("completed", "", "")
    try:
        async with db.session() as session, session.begin():
            batches = BatchRepository(session)
            keep = await batches.output_expiry(batch_id)
            files_expire = now + (DEFAULT_EXPIRY if keep is None else keep)
            if stop:
                await batches.settle_pending(batch_id, lambda custom_id: error_line(custom_id, code, message), now)
            files: dict[str, str] = {}
            for state, suffix in (("done", "output"), ("failed", "error")):
                content = await _render(batches, batch_id, state)
                if content:
                    files[suffix] = file_id = new_id("file-")
                    await FileRepository(session).add(file_id, purpose=OUTPUT_PURPOSE, content=content, owner=owner,
                                                      filename=f"{batch_id}_{suffix}.jsonl", now=now,
                                                      expires_at=files_expire)
            if not await batches.move(batch_id, final, now, expect=(status,), output_file_id=files.get("output"),
                                      error_file_id=files.get("error")):
                raise _Moved
            row = await batches.get(batch_id)
    except _Moved:
        return Outcome(None)
    assert row is not None
    return Outcome(final, f"{row.completed} of {row.total} completed, {row.failed} failed")


async def _render(batches: BatchRepository, batch_id: str, state: str) -> bytes:
    """The result lines of the batch's items in ``state``, in line order, as JSONL."""
    parts: list[bytes] = []
    after = 0
    while True:
        chunk = await batches.results(batch_id, state, after_line=after, limit=_READ_CHUNK)
        if not chunk:
            return b"".join(parts)
        parts.append(jsonl(result for _, result in chunk))
        after = chunk[-1][0]
