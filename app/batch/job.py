"""What the batch runner (``app.batch.runner``) keeps of an active batch: its items read and not
started, those in flight, those waiting to be tried again, and when it may start more."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from app.pool.context import RequestContext
from app.store.batches import PendingItem


@dataclass(slots=True)
class Running:
    task: asyncio.Task[None]
    ctx: RequestContext


@dataclass(eq=False)
class Job:
    """An active batch as the runner tracks it. ``cursor``: the last line read from the database in
    this pass over it; ``ready``: items read and not started; ``retries``: (when, line) of items
    waiting to be tried again."""

    id: str
    status: str
    owner: str | None
    endpoint: str
    input_file_id: str
    expires_at: float
    cursor: int = 0
    exhausted: bool = False
    ready: deque[PendingItem] = field(default_factory=deque)
    running: dict[int, Running] = field(default_factory=dict)
    retries: list[tuple[float, int]] = field(default_factory=list)
    paused_until: float = 0.0
    """The pool turned a request away before sending it: start no more before this time."""
    task: asyncio.Task[None] | None = None
    """Validation or finalization, while it runs."""
    task_after: float = 0.0
    """That work failed: not again before this time."""

    def stopping(self, now: float) -> bool:
        return self.status == "cancelling" or now >= self.expires_at

    def drained(self) -> bool:
        return self.exhausted and not self.ready and not self.retries and not self.running
