"""kimi-pool's log lines: one access line per request, and the JSON form of every log record.

An access line is a ``Fields`` message on the ``kimi_pool.access`` logger: ``key=value`` pairs as
text, its own keys in JSON. It names the client key, never the key itself; no credential (the
master key, client keys, account API keys or tokens) is ever put in a log line.
"""

from __future__ import annotations

import datetime as dt
import logging

import orjson

from app.errors import UpstreamError
from app.store.records import UsageRecord

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
    the error's class, not the upstream's message, which could quote what it was sent)."""

    def __init__(self, access: logging.Logger | None = None, upstream: logging.Logger | None = None, *,
                 worker: int | None = None) -> None:
        """``worker``: this process's index under ``serve --workers N``, added to each access line."""
        self._access = access or logging.getLogger("kimi_pool.access")
        self._upstream = upstream or logging.getLogger("kimi_pool.upstream")
        self._worker = worker

    def finished(self, record: UsageRecord, waited_ms: float | None, first_byte_ms: float | None) -> None:
        if not self._access.isEnabledFor(logging.INFO):
            return
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
        self._access.info(fields)

    def upstream_failed(self, request_id: str, account: str, error: UpstreamError) -> None:
        if self._upstream.isEnabledFor(logging.INFO):
            self._upstream.info(Fields(request_id=request_id, account=account, error=type(error).__name__,
                                       status=error.status, code=error.code))
