"""Where the server's log records go: a stream (stderr), with requests' lines written in batches.

Every request logs an access line. Written one at a time (a ``write`` and a ``flush``, a system call,
each) they cost the server a sizeable share of its CPU per request. ``AccessLog`` already logs them
in bursts (``app.logs``); ``BufferedHandler`` formats each line of a burst (a ``Fields`` message
logged inside the event loop) and writes the burst in one write at the end of the loop's current
round. Any other record (startup, warnings, errors, anything logged outside the loop) is written at
once, after whatever is queued, so the order on the stream is the order of the calls. ``flush``
(called at exit by ``logging.shutdown``, and by ``close``) writes whatever is queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TextIO

from app.logs import Fields

MOST_QUEUED = 10_000
"""Lines queued at most; beyond, they are written at once."""


class BufferedHandler(logging.Handler):
    def __init__(self, stream: TextIO, most: int = MOST_QUEUED) -> None:
        super().__init__()
        self._stream = stream
        self._most = most
        self._queued: list[str] = []
        self._closed = False

    def emit(self, record: logging.LogRecord) -> None:
        if type(record.msg) is Fields and not record.exc_info and not self._closed and len(self._queued) < self._most:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                text = self._format(record)
                if text is not None:
                    if not self._queued:
                        loop.call_soon(self.flush)
                    self._queued.append(text)
                return
        self._write(record)

    def flush(self) -> None:
        self._write(None)

    def close(self) -> None:
        """Write what is queued; later records are written at once."""
        self._closed = True
        self.flush()
        super().close()

    def _write(self, last: logging.LogRecord | None) -> None:
        """Write what is queued, then ``last``, in one write."""
        with self.lock:  # type: ignore[union-attr]
            lines, self._queued = self._queued, []
            if last is not None and (text := self._format(last)) is not None:
                lines.append(text)
            if not lines:
                return
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except Exception:
                self.handleError(last or logging.makeLogRecord({"msg": "writing the log failed"}))

    def _format(self, record: logging.LogRecord) -> str | None:
        try:
            return self.format(record)
        except Exception:
            self.handleError(record)
            return None


class TextFormatter(logging.Formatter):
    """``logging.Formatter`` with the date and time of a second formatted once for all its lines (a
    busy server writes thousands of lines a second; ``strftime`` was a third of formatting one)."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"
