"""Plain records handed to the store by the request path (through ``WriteBehind``).

They are frozen value objects, free of SQLAlchemy, so the dispatcher can build them without
touching the database layer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRecord:
    """One finished request. ``client_key`` is the client key's *name*, never the key itself."""

    ts: float
    request_id: str
    account: str | None
    client_key: str | None
    model: str
    status: int
    outcome: str
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    attempts: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class StateChange:
    """An account's runtime state transition, as reported by the pool."""

    ts: float
    account: str
    state: str
    until: float | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class IdempotentAnswer:
    """The stored answer to a request that carried an ``Idempotency-Key`` (``app.idempotency``).

    ``key`` is scoped by the client key's name (``"<name or ''>:<header>"``); ``body`` is the
    ``chat.completion`` JSON, also for an answer that was streamed."""

    key: str
    request_hash: str
    status: int
    body: bytes
    created_at: float
    expires_at: float
