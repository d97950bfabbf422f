"""Points and spans of time as operators write them: ``30m``, ``24h``, ``7d``, or an ISO date/time.

Shared by the CLI (``usage``, ``sessions purge``) and the admin API, so both read times alike.
Callers turn ``ValueError`` into their own error (a CLI line, an OpenAI-format 400).
"""

from __future__ import annotations

import datetime as dt
import re

WHEN_HELP = "a duration back from now (30m, 24h, 7d, 2w) or a UTC date or time (2026-11-01, 2026-11-01T08:00)"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration_seconds(text: str) -> float | None:
    """``30m``, ``12h``, ``7d`` (also ``s`` and ``w``) → seconds; None if ``text`` is not such a duration."""
    match = _DURATION.match(text.strip().lower())
    return None if match is None else float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_when(text: str, now: float) -> float:
    """A duration back from ``now`` or an ISO date/time (UTC unless it names a zone) → epoch seconds.

    A span longer than the epoch means "since the beginning". Raises ``ValueError`` otherwise."""
    seconds = duration_seconds(text)
    if seconds is not None:
        return max(0.0, now - seconds)
    when = dt.datetime.fromisoformat(text.strip())
    return (when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)).timestamp()


def utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def span(seconds: float) -> str:
    """A length of time as an operator reads it: ``45s``, ``2m30s``, ``5h10m``, ``3d4h``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds % 60 else f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
