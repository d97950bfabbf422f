"""Settings: the server's options, from the command line and the environment. Opens nothing.

What an operator declares about accounts and model aliases (``accounts.toml``, CLI flags) is in
``app.accounts_config``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from app.errors import ConfigError

DEFAULT_DB_URL = "sqlite+aiosqlite:///./kimi-pool.db"
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Settings:
    db_url: str = DEFAULT_DB_URL
    host: str = "127.0.0.1"
    port: int = 8088
    master_key: str | None = None
    accounts_file: Path | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    connect_timeout: float = 10.0
    first_byte_timeout: float = 300.0
    failover_deadline: float = 60.0
    max_wait: float = 30.0
    """Longest a request waits in the admission queue for an account with room (per request:
    ``X-Kimi-Pool-Max-Wait``, capped by this)."""
    max_queue: int = 1000
    max_queue_per_key: int = 250
    """Most requests of one client key waiting in the admission queue (its share of ``max_queue``)."""
    default_max_tokens: int = 1024
    session_ttl: float = 24 * 3600.0
    """How long a conversation stays bound to its account after its last turn."""
    max_sessions_per_key: int = 10_000
    """Most conversation bindings one client key holds; a new one drops its least recently used."""
    """The completion budget charged up front when a request names no ``max_tokens``."""
    idempotency_ttl: float = 24 * 3600.0
    """How long the answer to a request with an ``Idempotency-Key`` is kept for its retries."""
    sync_interval: float = 2.0
    """How often the server re-reads accounts and keys (for writers that cannot tell it at once)."""
    models_refresh: float = 3600.0
    """Seconds between asking each account's upstream which models it serves (``app.discovery``); 0: never
    (models then change only with ``accounts add``/``edit``/``check``)."""
    flush_interval: float = 1.0
    """How often usage rows and sessions are written (the write-behind): what a ``kill -9`` may lose."""
    cors_origins: tuple[str, ...] = ("*",)
    log_level: str = "info"
    shutdown_grace: float = 30.0
    """After SIGTERM: how long in-flight requests and streams may take before the server stops."""
    log_format: str = "text"
    """``text`` (one line per record, an access line as ``key=value`` pairs) or ``json`` (one object per line)."""
    interactive_share: float = 0.2
    """The fraction of each account's concurrency and windows that batch work leaves free for
    interactive requests (which may use the whole)."""
    max_file_bytes: int = 100 * 1024 * 1024
    """The largest file ``POST /v1/files`` takes (batch input files)."""
    max_files_per_key: int = 10_000
    """Most files one client key keeps stored (its batches' output files count too)."""
    max_file_bytes_per_key: int = 10 * 1024 ** 3
    """Most bytes of files one client key keeps stored (its batches' output files count too)."""
    batch_concurrency: int = 256
    """Most batch requests in flight at once (waiting for an account included); the pool paces them."""
    batch_max_wait: float = 300.0
    """How long one batch request may wait for an account with room before it is tried again later."""
    batch_max_attempts: int = 5
    """Attempts a batch request gets when the upstream keeps failing (429, 5xx) before it is an error."""
    workers: int = 1
    """Processes serving chat completions (``serve --workers N``); above 1, this process keeps the pool
    and the workers lease from it."""
    max_header_bytes: int = 64 * 1024
    """The longest request line + headers a connection may send (``app.netguard``); longer: 431."""
    header_timeout: float = 10.0
    """Seconds a connection has to send a whole request head, from its start or the end of its previous
    response; then it is closed."""
    max_connections: int = 10_000
    """Most connections each serving process keeps open; beyond, a new one gets 503 at once."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("KIMI_POOL_DB"):
            values["db_url"] = env["KIMI_POOL_DB"]
        master = env.get("KIMI_POOL_MASTER_KEY") or env.get("API_MASTER_KEY")
        if master:
            values["master_key"] = master
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not (0 < self.port < 65536):
            raise ConfigError(f"port must be between 1 and 65535, not {self.port}")
        if not 0 < self.flush_interval <= 3600:
            raise ConfigError(f"the flush interval must be above 0 and at most 3600 s, not {self.flush_interval!r}")
        if self.models_refresh < 0:
            raise ConfigError(f"the models refresh interval must not be negative, not {self.models_refresh!r}")
        if self.max_wait < 0 or self.max_queue < 0 or self.default_max_tokens < 1:
            raise ConfigError("max wait and queue depth must not be negative; default max tokens at least 1")
        if not 0 <= self.interactive_share < 1:
            raise ConfigError(f"the interactive share is a fraction from 0 up to (not including) 1, "
                              f"not {self.interactive_share!r}")
        if self.max_file_bytes < 1 or self.batch_concurrency < 1 or self.batch_max_attempts < 1 \
                or self.batch_max_wait < 0:
            raise ConfigError("the file size limit, batch concurrency and attempts must be positive")
        if min(self.max_queue_per_key, self.max_sessions_per_key, self.max_files_per_key,
               self.max_file_bytes_per_key) < 1:
            raise ConfigError("the per-key caps (queue, sessions, files, file bytes) must be at least 1")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be between 1 and 64, not {self.workers}")
        if self.max_header_bytes < 1024 or not self.header_timeout > 0 or self.max_connections < 1:
            raise ConfigError("max header bytes must be at least 1024, the header timeout above 0 and max "
                              "connections at least 1")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"bad log format {self.log_format!r}: use {' or '.join(LOG_FORMATS)}")
        if "://" not in self.db_url:
            raise ConfigError(f"database URL {self.db_url!r} is not a URL (e.g. {DEFAULT_DB_URL})")
        if self.master_key is None and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without a key: set KIMI_POOL_MASTER_KEY "
                "(or API_MASTER_KEY), or bind 127.0.0.1"
            )

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, an IPv6 one with or without brackets) is this machine's
    loopback: ``localhost``, ``127.0.0.0/8`` or ``::1``. Parsed, never matched by prefix, so
    ``127.evil.example`` is not."""
    if host.lower() == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
