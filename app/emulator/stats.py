"""Counters an emulator keeps per credential, per owner (organization, user) and in total.

Tests read them in-process (``emulator.stats``) or over HTTP (``GET /__fake/state``); both views
use string keys (``by_status["429"]``) so the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Counters:
    requests: int = 0
    """Chat requests seen, whatever their answer."""
    by_status: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    """Refusals by reason: ``concurrency``, ``rpm``, ``tpm``, ``tpd``, ``quota``, ``overloaded``."""
    in_flight: int = 0
    peak_in_flight: int = 0
    completed: int = 0
    """Answers delivered in full (streams with their end marker, whole JSON bodies)."""
    completed_streams: int = 0
    client_disconnects: int = 0
    """Answers the client walked away from before their end."""
    dropped: int = 0
    """Answers the emulator cut on purpose (scripted ``drop_after``)."""
    tokens_charged: int = 0
    """Tokens charged up front to the TPM/TPD windows (prompt estimate + max tokens)."""
    tokens_used: int = 0
    """Tokens actually produced and billed (prompt + completion)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "rejected": dict(self.rejected),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "completed": self.completed,
            "completed_streams": self.completed_streams,
            "client_disconnects": self.client_disconnects,
            "dropped": self.dropped,
            "tokens_charged": self.tokens_charged,
            "tokens_used": self.tokens_used,
        }

    def reset(self) -> None:
        """Zero the counters; ``in_flight`` is the present, not history, and stays."""
        in_flight = self.in_flight
        for name, value in type(self)().to_dict().items():
            setattr(self, name, value)
        self.in_flight = self.peak_in_flight = in_flight


def bump_status(groups: Iterable[Counters], status: int, reason: str | None = None) -> None:
    """Record one answered request with ``status`` (and a refusal ``reason``) in every group."""
    code = str(status)
    for counters in groups:
        counters.requests += 1
        counters.by_status[code] = counters.by_status.get(code, 0) + 1
        if reason is not None:
            counters.rejected[reason] = counters.rejected.get(reason, 0) + 1


def enter(groups: Iterable[Counters]) -> None:
    for counters in groups:
        counters.in_flight += 1
        if counters.in_flight > counters.peak_in_flight:
            counters.peak_in_flight = counters.in_flight


def leave(groups: Iterable[Counters]) -> None:
    for counters in groups:
        counters.in_flight -= 1
