"""The tables. Times are float seconds since the epoch, taken from the injected clock."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class AccountRow(Base):
    """An upstream credential. Operator fields are written by the CLI/admin API (which bump
    ``config_rev``); the runtime ``state*`` fields are written by the server."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    secret: Mapped[str | None] = mapped_column(Text)
    base_url: Mapped[str | None] = mapped_column(Text)
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    tpd: Mapped[int | None] = mapped_column(Integer)
    concurrency: Mapped[int | None] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    proxy: Mapped[str | None] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32), default="active")
    state_until: Mapped[float | None] = mapped_column(Float)
    state_reason: Mapped[str | None] = mapped_column(Text)
    state_rev: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Bumped by every write of the runtime state (the server's, a probe's, an operator's revive): the
    server writes a state only over the revision it knows (``AccountRepository.replace_state``)."""
    config_rev: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    discovered_models: Mapped[list[str] | None] = mapped_column(JSON)
    """The model ids the upstream said it serves (``app.discovery``); None: never asked, or its kind does not tell."""
    models_checked_at: Mapped[float | None] = mapped_column(Float)
    """When the upstream last told its models."""
    learned_limits: Mapped[dict[str, dict[str, float]] | None] = mapped_column(JSON)
    """What the server learned of the limits from the upstream's 429s: bucket → ``{"limit", "at"}``
    (``app.pool.limits``), written by the server."""
    limits_rev: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Bumped by ``accounts reset-limits``: a running server forgets what it learned of an account whose
    ``limits_rev`` changed, and never writes learned limits over a newer ``limits_rev``."""
    load_error: Mapped[str | None] = mapped_column(Text)
    """Why the server could not load the account's credential (an ``env:VAR`` unset in its environment, a
    lapsed token), written by the server; None when it could."""


class ClientKeyRow(Base):
    """A client API key; only its SHA-256 is stored, and a short prefix to recognise it by."""

    __tablename__ = "client_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class UsageRow(Base):
    """One finished request (successful or not)."""

    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_ts", "ts"), Index("ix_usage_account_ts", "account", "ts"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    request_id: Mapped[str] = mapped_column(String(64))
    account: Mapped[str | None] = mapped_column(String(64))
    client_key: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=1)


class HealthEventRow(Base):
    """An account state transition, with why it happened."""

    __tablename__ = "health_events"
    __table_args__ = (Index("ix_health_account_ts", "account", "ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    account: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    until: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)


class SessionRow(Base):
    """A conversation key bound to the account that holds it (``app.pool.sessions.Binding``)."""

    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_expires_at", "expires_at"),)

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    account: Mapped[str] = mapped_column(String(64))
    chat_id: Mapped[str | None] = mapped_column(Text)
    parent_id: Mapped[str | None] = mapped_column(Text)
    turns: Mapped[int | None] = mapped_column(Integer, default=0)
    last_used: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    client_key: Mapped[str | None] = mapped_column(String(64))
    """The name of the client key whose conversation it is (a key's bindings are capped)."""


class ModelAliasRow(Base):
    """An operator's model alias (``app.catalogue``): name → account kind → upstream model id.
    Empty ``targets`` hides a built-in alias of that name."""

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    targets: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[float] = mapped_column(Float)


class FileRow(Base):
    """A file of the OpenAI Files API: a batch's input (``batch``), or its output or errors
    (``batch_output``). ``content`` is deferred: listings never load it."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_client_created", "client_key", "created_at"),
                      Index("ix_files_expires_at", "expires_at"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column("bytes", Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[float] = mapped_column(Float)
    client_key: Mapped[str | None] = mapped_column(String(64))
    """The name of the client key that owns it (``master``; None on an open gateway)."""
    expires_at: Mapped[float | None] = mapped_column(Float)
    """When it is deleted (the upload's ``expires_after``, its batch's ``output_expires_after``); None: kept."""


class BatchRow(Base):
    """A batch job of the OpenAI Batch API (``app.batch``). Its counts move in the same transaction
    as its items' results; the timestamps are those of OpenAI's batch object."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_status", "status"),
                      Index("ix_batches_client_created", "client_key", "created_at"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    input_file_id: Mapped[str] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    client_key: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    output_expires_after: Mapped[float | None] = mapped_column(Float)
    """Seconds after they are written that its output and error files expire (``output_expires_after``)."""

    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    """Why the batch failed (its input file), as OpenAI's ``errors.data``; None otherwise."""
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    in_progress_at: Mapped[float | None] = mapped_column(Float)
    finalizing_at: Mapped[float | None] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    failed_at: Mapped[float | None] = mapped_column(Float)
    expired_at: Mapped[float | None] = mapped_column(Float)
    cancelling_at: Mapped[float | None] = mapped_column(Float)
    cancelled_at: Mapped[float | None] = mapped_column(Float)


class BatchItemRow(Base):
    """One line of a batch's input file. ``pending`` until its result line is stored (``done``, or
    ``failed`` with an error line); a line refused at validation is ``failed`` from the start, with
    no ``body``. ``result`` is the whole output or error-file line."""

    __tablename__ = "batch_items"
    __table_args__ = (Index("ix_batch_items_state", "batch_id", "state", "line"),)

    batch_id: Mapped[str] = mapped_column(String(40), ForeignKey("batches.id", ondelete="CASCADE"),
                                          primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    custom_id: Mapped[str | None] = mapped_column(Text)
    body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    retry_at: Mapped[float | None] = mapped_column(Float)
    """A pending item that failed and waits to be tried again: not before this time."""
    updated_at: Mapped[float] = mapped_column(Float)


class IdempotencyRow(Base):
    """A chat answer kept for its ``Idempotency-Key``: a retry with the same key and body gets it back."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_expires_at", "expires_at"),)

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    """``<client key name or ''>:<Idempotency-Key header>``."""
    request_hash: Mapped[str] = mapped_column(String(64))
    """SHA-256 hex of the canonical request body."""
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class ServerSecretRow(Base):
    """Keys the server makes for itself once and shares between its processes and instances (the sealing key
    that signs thinking blocks and encrypts reasoning handed to clients)."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)
