"""Files and batch jobs as their owner manages them: what the ``/v1/files`` and ``/v1/batches``
endpoints do, and what a command line can call as well (``BatchService(db, clock, ...)``).

Every call names its ``owner``, the caller's client key name (``master`` sees everything, None is
an open gateway); what another key owns is "not found". Creating or cancelling a batch tells
``on_change(batch_id, status)`` (the runner, in the server) so work starts or stops at once.

Each owner keeps at most ``max_files`` files of at most ``max_bytes`` in all (its batches' output
files count, but are never refused: a batch's results are written whatever). A file expires as its
upload's ``expires_after`` says (``{"anchor": "created_at", "seconds": N}``, as OpenAI's Files API
takes it), a batch's output and error files as its ``output_expires_after`` says, and by default
after 30 days, as OpenAI's batch files do (``app.batch.expiry``); an expired file is gone at once
and no longer counts, and ``on_expiry(at)`` tells the sweeper when to delete it.
Validation of the input file's lines happens in the runner, so a big file never holds up the
request that creates its batch.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from app.batch.expiry import DEFAULT_EXPIRY, expiry_seconds
from app.batch.lines import new_id
from app.clock import Clock
from app.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from app.store.batches import BatchRepository, FileRepository
from app.store.db import Database
from app.store.models import BatchRow, FileRow

PURPOSE = "batch"
FILE_COUNT_CAP, FILE_BYTES_CAP = "key_file_count_exceeded", "key_file_bytes_exceeded"
ENDPOINTS = ("/v1/chat/completions",)
MAX_WINDOW_HOURS = 24 * 30
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")
_METADATA_PAIRS, _METADATA_KEY, _METADATA_VALUE = 16, 64, 512


def window_seconds(window: Any) -> float:
    """``"24h"`` → 86,400; any whole number of hours up to 30 days."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    if match is None or int(match.group(1)) > MAX_WINDOW_HOURS:
        raise InvalidRequest(f"'completion_window' must be a whole number of hours such as '24h' (at most "
                             f"{MAX_WINDOW_HOURS}h), not {window!r}.", param="completion_window")
    return int(match.group(1)) * 3600.0


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > _METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= _METADATA_KEY and len(v) <= _METADATA_VALUE
            for k, v in metadata.items()):
        raise InvalidRequest(f"'metadata' must be an object of at most {_METADATA_PAIRS} string values, keys of at "
                             f"most {_METADATA_KEY} characters and values of at most {_METADATA_VALUE}.",
                             param="metadata")
    return dict(metadata)


def _nothing(batch_id: str, status: str) -> None:
    return None


def _never(at: float) -> None:
    return None


class BatchService:
    def __init__(self, db: Database, clock: Clock, *, max_file_bytes: int, max_files: int | None = None,
                 max_bytes: int | None = None, on_change: Callable[[str, str], None] = _nothing,
                 on_expiry: Callable[[float], None] = _never) -> None:
        self._db = db
        self._clock = clock
        self.max_file_bytes = max_file_bytes
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._on_change = on_change
        self._on_expiry = on_expiry
        self._adding = asyncio.Lock()  # one owner's count and its new file: one decision at a time

    # --- files ------------------------------------------------------------------------------------

    def check_size(self, size: int) -> None:
        if size > self.max_file_bytes:
            raise PayloadTooLarge(f"The file is larger than the limit of {self.max_file_bytes} bytes "
                                  f"({self.max_file_bytes / 2**20:g} MiB).", param="file")

    async def add_file(self, owner: str | None, *, filename: str, purpose: Any, content: bytes,
                       expires_after: Any = None) -> FileRow:
        if purpose != PURPOSE:
            raise InvalidRequest(f"kimi-pool keeps files for batches only: 'purpose' must be '{PURPOSE}', not "
                                 f"{purpose!r}.", param="purpose")
        self.check_size(len(content))
        seconds = expiry_seconds(expires_after, "expires_after")
        async with self._adding, self._db.session() as session, session.begin():
            files, now = FileRepository(session), self._clock.time()
            count, size = await files.held(owner, now)
            self._check_caps(count + 1, size + len(content))
            expires_at = now + (DEFAULT_EXPIRY if seconds is None else seconds)
            row = await files.add(new_id("file-"), purpose=purpose, filename=filename, content=content, owner=owner,
                                  now=now, expires_at=expires_at)
        self._on_expiry(expires_at)
        return row

    def _check_caps(self, count: int, size: int) -> None:
        if self._max_files is not None and count > self._max_files:
            raise InvalidRequest(f"This key keeps {count - 1} files, its limit of {self._max_files}: delete some "
                                 "(DELETE /v1/files/{id}) or wait for them to expire.", param="file",
                                 code=FILE_COUNT_CAP)
        if self._max_bytes is not None and size > self._max_bytes:
            raise InvalidRequest(f"This file would bring the files this key keeps to {size} bytes, beyond its limit "
                                 f"of {self._max_bytes}: delete some (DELETE /v1/files/{{id}}) or wait for them to "
                                 "expire.", param="file", code=FILE_BYTES_CAP)

    async def file(self, owner: str | None, file_id: str) -> FileRow:
        async with self._db.session() as session:
            return _found_file(await FileRepository(session).get(file_id, owner, self._clock.time()), file_id)

    async def file_content(self, owner: str | None, file_id: str) -> tuple[FileRow, bytes]:
        async with self._db.session() as session:
            files = FileRepository(session)
            row = _found_file(await files.get(file_id, owner, self._clock.time()), file_id)
            return row, await files.content(file_id) or b""

    async def files(self, owner: str | None, *, limit: int, after: str | None = None, purpose: str | None = None,
                    descending: bool = True) -> tuple[list[FileRow], bool]:
        async with self._db.session() as session:
            return await FileRepository(session).page(owner, limit=limit, after=after, purpose=purpose,
                                                      descending=descending, now=self._clock.time())

    async def delete_file(self, owner: str | None, file_id: str) -> None:
        async with self._db.session() as session, session.begin():
            files = FileRepository(session)
            _found_file(await files.get(file_id, owner, self._clock.time()), file_id)
            await files.delete(file_id)

    # --- batches ----------------------------------------------------------------------------------

    async def create(self, owner: str | None, *, input_file_id: Any, endpoint: Any, completion_window: Any,
                     metadata: Any = None, output_expires_after: Any = None) -> BatchRow:
        """A new batch, ``validating``; the runner reads its file and starts it."""
        if not isinstance(input_file_id, str) or not input_file_id:
            raise InvalidRequest("'input_file_id' is required: the id of a file uploaded with purpose 'batch'.",
                                 param="input_file_id")
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"'endpoint' must be {' or '.join(ENDPOINTS)}, not {endpoint!r}.", param="endpoint")
        seconds = window_seconds(completion_window)
        meta = check_metadata(metadata)
        keep = expiry_seconds(output_expires_after, "output_expires_after")
        async with self._db.session() as session, session.begin():
            source = _found_file(await FileRepository(session).get(input_file_id, owner, self._clock.time()),
                                 input_file_id)
            if source.purpose != PURPOSE:
                raise InvalidRequest(f"The file {input_file_id} was not uploaded with purpose '{PURPOSE}'.",
                                     param="input_file_id")
            now = self._clock.time()
            row = await BatchRepository(session).add(BatchRow(
                id=new_id("batch_"), status="validating", endpoint=endpoint, completion_window=completion_window,
                input_file_id=input_file_id, client_key=owner, meta=meta, total=0, completed=0, failed=0,
                created_at=now, expires_at=now + seconds, output_expires_after=keep))
        self._on_change(row.id, row.status)
        return row

    async def batch(self, owner: str | None, batch_id: str) -> BatchRow:
        async with self._db.session() as session:
            return _found_batch(await BatchRepository(session).get(batch_id, owner), batch_id)

    async def batches(self, owner: str | None, *, limit: int, after: str | None = None) -> tuple[list[BatchRow], bool]:
        async with self._db.session() as session:
            return await BatchRepository(session).page(owner, limit=limit, after=after)

    async def cancel(self, owner: str | None, batch_id: str) -> BatchRow:
        """Stop a batch: ``cancelling`` (requests in flight finish, no other starts), then ``cancelled``
        with the results so far. A batch cancelling or cancelled already is left as it is."""
        async with self._db.session() as session, session.begin():
            batches = BatchRepository(session)
            row = _found_batch(await batches.get(batch_id, owner), batch_id)
            if row.status in ("cancelling", "cancelled"):
                return row
            if not await batches.move(batch_id, "cancelling", self._clock.time(), expect=("validating", "in_progress")):
                raise Conflict(f"The batch {batch_id} is {row.status} and can no longer be cancelled.",
                               code="batch_not_cancellable")
            await session.refresh(row)
        self._on_change(row.id, row.status)
        return row


def _found_file(row: FileRow | None, file_id: str) -> FileRow:
    if row is None:
        raise NotFound(f"No such file: {file_id}.", param="file_id")
    return row


def _found_batch(row: BatchRow | None, batch_id: str) -> BatchRow:
    if row is None:
        raise NotFound(f"No such batch: {batch_id}.", param="batch_id")
    return row
