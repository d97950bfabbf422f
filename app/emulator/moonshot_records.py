"""The Moonshot emulator's records: counters, the state of an organization and of a key, and the
verdicts on a chat request (``Answer``: an immediate reply; ``Ticket``: an admitted request).
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Any

from app.emulator import moonshot_wire as wire
from app.emulator.control import Outcome
from app.emulator.moonshot_config import Org
from app.emulator.moonshot_prompt import PromptCache
from app.emulator.moonshot_turn import Turn
from app.emulator.stats import Counters
from app.emulator.windows import DayWindow, SlidingWindow


@dataclass(slots=True)
class MoonshotCounters(Counters):
    """``Counters`` and what the agent features add."""

    cached_tokens: int = 0
    """Prompt tokens reported as ``cached_tokens`` (a repeated prefix)."""
    tool_calls: int = 0
    """Tool calls answered (``$web_search`` ones included)."""
    web_searches: int = 0
    """``$web_search`` calls answered: the searches the platform ran."""

    def to_dict(self) -> dict[str, Any]:
        return {**Counters.to_dict(self), "cached_tokens": self.cached_tokens, "tool_calls": self.tool_calls,
                "web_searches": self.web_searches}


@dataclass(slots=True)
class MoonshotStats:
    keys: dict[str, MoonshotCounters]
    orgs: dict[str, MoonshotCounters]
    totals: MoonshotCounters


@dataclass(slots=True)
class Answer:
    """An immediate answer: an error, or a utility route's body."""

    status: int
    body: bytes
    headers: wire.Headers = wire.JSON_HEADERS


class OrgState:
    __slots__ = ("cache", "counters", "org", "rpm", "tpd", "tpm")

    def __init__(self, org: Org, counters: MoonshotCounters, tpd_window: str, cache_entries: int) -> None:
        self.org = org
        self.counters = counters
        self.rpm = SlidingWindow(60.0)
        self.tpm = SlidingWindow(60.0)
        self.tpd: SlidingWindow | DayWindow = (
            SlidingWindow(86_400.0) if tpd_window == "rolling" else DayWindow())
        self.cache = PromptCache(cache_entries)


class KeyState:
    __slots__ = ("groups", "org", "recent", "who")

    def __init__(self, key: str, org: OrgState, counters: MoonshotCounters, totals: MoonshotCounters,
                 recorded: int) -> None:
        self.org = org
        self.who = f"{org.org.name}<ak-{hashlib.sha256(key.encode()).hexdigest()[:20]}>"
        self.groups = (counters, org.counters, totals)
        self.recent: deque[dict[str, Any]] = deque(maxlen=recorded)
        """The last request bodies with this key, newest last."""


@dataclass(slots=True)
class Ticket:
    """An admitted chat request: charged to its organization's windows and counted in flight."""

    key: KeyState
    who: wire.Identity
    turn: Turn
    prompt_tokens: int
    cached_tokens: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    outcome: Outcome | None
    headers: wire.Headers
    """Extra response headers (``X-RateLimit-*`` when that knob is on)."""
