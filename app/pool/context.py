"""What the pool and the dispatcher know of one request while it is served: who asks, how long it may
wait, the conversation it belongs to, and what happened to it so far."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from app.pool.sessions import Binding


@dataclass(slots=True)
class RequestContext:
    request_id: str
    client: str | None
    max_wait: float = 0.0
    """How long the request may wait in the admission queue for an account with room."""
    session: str | None = None
    """The conversation key, when the request belongs to a conversation worth keeping on one account."""
    started: float = field(default_factory=time.perf_counter)
    account: str | None = None
    attempts: int = 0
    waited: float = 0.0
    """Seconds spent waiting for an account (the admission queue, over all attempts), on the pool's clock."""
    binding: Binding | None = None
    """The session's binding once a lease was taken (None: a one-off request)."""
    needs: frozenset[str] = frozenset()
    """What the account must be able to do for this request (``app.capabilities``)."""
    batch: bool = False
    """A batch job's request: it gets the pool's batch share, after waiting interactive requests."""
    gone: Callable[[], Awaitable[None]] | None = None
    """Returns when the client has closed its connection (None: not watched). Watched only while the
    request waits for an account, so a client that gives up never costs an upstream call."""
