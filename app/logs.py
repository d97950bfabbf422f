"""kimi-pool's log lines: one access line per request, and the JSON form of every log record.

An access line is a ``Fields`` message on the ``kimi_pool.access`` logger: ``key=value`` pairs as
text, its own keys in JSON. It names the client key, never the key itself; no credential (the
master key, client keys, account API keys or tokens) is ever put in a log line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

import orjson

from app.errors import UpstreamError
from app.store.records import UsageRecord

FLUSH_INTERVAL = 0.2
"""Seconds a request's log lines may wait before they are logged."""
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/@+-")


class Fields(dict[str, object]):
    """A log message made of named values: ``key=value ...`` as text (a value with spaces, quotes or
    control characters in JSON quotes; None as ``-``), and its keys as keys in ``JsonFormatter``."""

    def __str__(self) -> str:
        return " ".join(f"{key}={_text(value)}" for key, value in self.items())


def _text(value: object) -> str:
    if value is None:
        return "-"
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int or type(value) is float:
        return str(value)
    text = str(value)
    if text and _PLAIN.issuperset(text):
        return text
    return orjson.dumps(text).decode()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, then ``message`` or,
    for a ``Fields`` message, its fields; ``exc_info`` with the traceback when there is one.

    A dozen lines of our own rather than python-json-logger: orjson is already here, and the
    object holds exactly these keys, never whatever ``extra`` a library attached to a record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        if isinstance(record.msg, Fields) and not record.args:
            out.update(record.msg)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


class AccessLog:
    """The dispatcher's observer that writes the access line of each finished request (INFO on
    ``kimi_pool.access``) and a line for each failed upstream attempt (INFO on ``kimi_pool.upstream``,
    the error's class, not the upstream's message, which could quote what it was sent).

    Off the request path: a request only queues what its line will say (and when); every ``interval``
    seconds the queued lines are made into log records, stamped with that time, and logged together,
    which costs a third of logging each alone in the middle of a request's work. ``flush`` logs what is
    queued at once; the lifespan calls it at shutdown, so no line is lost."""

    def __init__(self, access: logging.Logger | None = None, upstream: logging.Logger | None = None, *,
                 worker: int | None = None, interval: float = FLUSH_INTERVAL) -> None:
        """``worker``: this process's index under ``serve --workers N``, added to each access line."""
        self._access = access or logging.getLogger("kimi_pool.access")
        self._upstream = upstream or logging.getLogger("kimi_pool.upstream")
        self._worker = worker
        self._interval = interval
        self._queued: list[tuple[float, UsageRecord | Fields, float | None, float | None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def finished(self, record: UsageRecord, waited_ms: float | None, first_byte_ms: float | None) -> None:
        if self._access.isEnabledFor(logging.INFO):
            self._queue((time.time(), record, waited_ms, first_byte_ms))

    def upstream_failed(self, request_id: str, account: str, error: UpstreamError) -> None:
        if self._upstream.isEnabledFor(logging.INFO):
            self._queue((time.time(), Fields(request_id=request_id, account=account, error=type(error).__name__,
                                             status=error.status, code=error.code), None, None))

    def flush(self) -> None:
        """Log every queued line now, in the order they came."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queued = self._queued, []
        for created, what, waited_ms, first_byte_ms in queued:
            if type(what) is Fields:
                _info(self._upstream, what, created)
            else:
                assert isinstance(what, UsageRecord)
                _info(self._access, self._fields(what, waited_ms, first_byte_ms), created)

    def _queue(self, entry: tuple[float, UsageRecord | Fields, float | None, float | None]) -> None:
        self._queued.append(entry)
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)
            except RuntimeError:  # no event loop to wait in: now
                self.flush()

    def _fields(self, record: UsageRecord, waited_ms: float | None, first_byte_ms: float | None) -> Fields:
        fields = Fields(
            request_id=record.request_id,
            client=record.client_key,
            account=record.account,
            model=record.model,
            stream=record.stream,
            status=record.status,
            outcome=record.outcome,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            latency_ms=round(record.latency_ms, 1),
            attempts=record.attempts,
        )
        if waited_ms is not None:
            fields["wait_ms"] = round(waited_ms, 1)
        if first_byte_ms is not None:
            fields["first_byte_ms"] = round(first_byte_ms, 1)
        if self._worker is not None:
            fields["worker"] = self._worker
        return fields


def _info(logger: logging.Logger, fields: Fields, created: float) -> None:
    """``logger.info(fields)`` as at ``created`` (a ``time.time()``), without looking up the caller's file
    and line, which no format shows."""
    record = logger.makeRecord(logger.name, logging.INFO, "", 0, fields, (), None)
    record.relativeCreated -= (record.created - created) * 1000
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    logger.handle(record)
