"""The kimi-ai.chat emulator's state: configuration, nonces, the throttle window, scripts, counters.

``KimiAiChatEmulator.begin`` runs one admin-ajax request through the site's check order
(PROTOCOLS.md 1.3) and returns either a ``Refusal`` (answered at once) or a ``Ticket`` (admitted:
it waits out its latency, then gets the reply); ``finish`` closes a ticket however its answer
ended. Nothing here writes bytes: ``kimi_ai_chat`` renders refusals, pages and replies.

Nonces follow WordPress: time is cut into ticks of ``nonce_tick`` seconds, a tick's nonce is 10 hex
characters of a hash of (salt, tick number), and a nonce is accepted during its own tick and the
next one. ``rotate_nonce`` moves the tick number on by one, as if a tick had passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.clock import Clock
from app.emulator.control import Controls, Outcome, OutcomeKinds, Param
from app.emulator.windows import SlidingWindow

ACTION = "kimi_send_message"
BAD_NONCE_MODES = ("wpcore", "wpcore_legacy", "plugin_json")
MESSAGE_POLICIES = ("truncate", "reject")
PAGE_MODES = ("ok", "stale", "challenge_403", "challenge_503", "no_nonce")
DEFAULT_MODELS = ("moonshotai/Kimi-K2-Instruct-0905", "moonshotai/Kimi-K2-Instruct")

# The site writes Chinese with full-width commas.
BAD_NONCE_MESSAGE = "安全验证失败\uff0c请刷新页面后重试 (invalid nonce)"
THROTTLED_MESSAGE = "请求过于频繁\uff0c请稍后再试 (rate limited)"
INVALID_MODEL_MESSAGE = "Invalid model"
EMPTY_MESSAGE = "Message is empty"
FAILURE_MESSAGE = "Request failed, please try again later"

REPLY_WORDS = ("Hello", "from", "the", "kimi-ai.chat", "emulator,", "a", "deterministic", "reply", "for",
               "testing", "the", "gateway.")
ECHO_CHARS = 40


def reply_text(message: str, words: int) -> str:
    """``Reply to: <last 40 characters of the message> — <words words>``, the same for the same input."""
    body = " ".join(REPLY_WORDS[i % len(REPLY_WORDS)] for i in range(words))
    return f"Reply to: {message[-ECHO_CHARS:]} — {body}"


def too_long_message(length: int, limit: int) -> str:
    return f"message too long ({length} characters, the limit is {limit})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class KimiAiChatEmulatorConfig:
    """The site's behaviour. Every field but ``nonce_seed`` can change at runtime (``configure``)."""

    nonce_tick: float = 12 * 3600
    """Seconds per nonce tick; a nonce is accepted in its own tick and the next (12 to 24 h in WordPress)."""
    bad_nonce_mode: str = "wpcore"
    """``wpcore``: ``-1`` with 403; ``wpcore_legacy``: ``-1`` with 200; ``plugin_json``: 200 ``success:false``."""
    max_message_chars: int = 1000
    message_policy: str = "truncate"
    """Longer messages: ``truncate`` keeps the first ``max_message_chars``; ``reject`` refuses them."""
    latency: float = 0.0
    """Seconds (on the injected clock) before an admitted request is answered."""
    reply_words: int = 12
    models: tuple[str, ...] = DEFAULT_MODELS
    page_mode: str = "ok"
    """``ok``, ``stale`` (a cached page: the nonce of the moment it was switched on), ``challenge_403``,
    ``challenge_503`` (Cloudflare "Just a moment..." pages) or ``no_nonce`` (200 without ``kimi_ajax``)."""
    throttle_requests: int | None = None
    """Requests with a good nonce let through per ``throttle_window`` seconds, site-wide; more are
    throttled (and a throttled request does not count). None: no limit."""
    throttle_window: float = 60.0
    nonce_seed: str | None = None
    """Salt of the nonces: a fixed seed gives the same nonces every run; None draws a random salt."""

    def __post_init__(self) -> None:
        problems = (
            (_is_number(self.nonce_tick) and self.nonce_tick > 0, "nonce_tick must be a positive number"),
            (self.bad_nonce_mode in BAD_NONCE_MODES, f"bad_nonce_mode must be one of {', '.join(BAD_NONCE_MODES)}"),
            (_is_int(self.max_message_chars) and self.max_message_chars >= 1,
             "max_message_chars must be a positive integer"),
            (self.message_policy in MESSAGE_POLICIES, f"message_policy must be one of {', '.join(MESSAGE_POLICIES)}"),
            (_is_number(self.latency) and self.latency >= 0, "latency must be a non-negative number"),
            (_is_int(self.reply_words) and self.reply_words >= 1, "reply_words must be a positive integer"),
            (isinstance(self.models, tuple) and bool(self.models)
             and all(isinstance(m, str) and m for m in self.models), "models must be a non-empty tuple of names"),
            (self.page_mode in PAGE_MODES, f"page_mode must be one of {', '.join(PAGE_MODES)}"),
            (self.throttle_requests is None or (_is_int(self.throttle_requests) and self.throttle_requests >= 0),
             "throttle_requests must be a non-negative integer or None"),
            (_is_number(self.throttle_window) and self.throttle_window > 0,
             "throttle_window must be a positive number"),
            (self.nonce_seed is None or isinstance(self.nonce_seed, str), "nonce_seed must be a string or None"),
        )
        for ok, problem in problems:
            if not ok:
                raise ValueError(problem)


RUNTIME_KNOBS = tuple(f.name for f in dataclasses.fields(KimiAiChatEmulatorConfig) if f.name != "nonce_seed")
"""Fields ``POST /__fake/config`` may change while the emulator runs."""

OUTCOME_KINDS: OutcomeKinds = {
    "ok": {},
    "bad_nonce": {"mode": Param("config", choices=("config", *BAD_NONCE_MODES))},
    "throttled": {},
    "http_error": {"status": Param(502, minimum=400, maximum=599), "body": Param("html", choices=("html", "text"))},
    "html_200": {},
    "reset": {},
    "truncate": {},
    "delay": {"seconds": Param(0.0)},
    "hold": {},
    "success_false": {"message": Param(FAILURE_MESSAGE)},
}
"""Scriptable outcomes and their parameters (with defaults), one consumed per ajax request."""

_SHAPING = ("ok", "truncate", "delay", "hold")
"""Outcomes that shape the reply of a request passing every check; the others answer at once."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer given at once, without latency.

    ``kind`` is one of ``bad_action``, ``bad_nonce``, ``throttled``, ``invalid_model``, ``too_long``,
    ``empty``, ``success_false``, ``http_error``, ``html_200`` and ``reset``. ``message`` is the
    ``data`` text of a ``success:false`` body; ``mode`` is the bad-nonce mode or the error-page style.
    """

    kind: str
    message: str = ""
    mode: str = ""
    status: int = 200


@dataclass(slots=True)
class Ticket:
    """An admitted request: counted in flight until ``finish``."""

    message: str
    model: str
    session_id: str | None
    reply: str
    wait: float
    hold: bool
    truncate: bool


@dataclass(slots=True)
class KimiAiChatStats:
    page_fetches: int = 0
    """``GET /chat/`` requests, whatever the page mode."""
    ajax_requests: int = 0
    ok: int = 0
    """Success answers delivered whole."""
    bad_nonce: int = 0
    """Nonce rejections, checked or scripted."""
    throttled: int = 0
    truncated_messages: int = 0
    """Messages cut to ``max_message_chars`` under the ``truncate`` policy."""
    answers: dict[str, int] = field(default_factory=dict)
    """Every ajax answer by kind: ``ok``, a ``Refusal`` kind, ``truncate`` or ``disconnect`` (client left)."""
    in_flight: int = 0
    peak_in_flight: int = 0
    last_message: str | None = None
    """The ``message`` field of the last ``kimi_send_message`` request (after truncation)."""
    last_model: str | None = None
    last_session_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def count(self, kind: str) -> None:
        self.answers[kind] = self.answers.get(kind, 0) + 1

    def reset(self) -> None:
        """Zero the counters; ``in_flight`` is the present, not history, and stays."""
        fresh = KimiAiChatStats(in_flight=self.in_flight, peak_in_flight=self.in_flight)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


class KimiAiChatEmulator(Controls):
    """The emulator's whole state (``app.state.emulator``).

    The site has no credentials, so scripts go to the one shared queue whatever ``key`` is given.
    Change knobs at runtime with ``configure`` (or ``POST /__fake/config``); ``snapshot()`` is the
    JSON view of the counters, the nonces, pending scripts and the configuration.
    """

    def __init__(self, config: KimiAiChatEmulatorConfig, clock: Clock) -> None:
        super().__init__(OUTCOME_KINDS, keyless=True)
        self.config = config
        self.clock = clock
        self.stats = KimiAiChatStats()
        self._salt = config.nonce_seed if config.nonce_seed is not None else os.urandom(8).hex()
        self._offset = 0
        self._throttle = SlidingWindow(config.throttle_window)
        self._stale_nonce = self.current_nonce if config.page_mode == "stale" else None

    # --- nonces ----------------------------------------------------------------------------------

    @property
    def tick(self) -> int:
        """The current tick number: clock ticks plus ``rotate_nonce`` calls."""
        return int(self.clock.time() // self.config.nonce_tick) + self._offset

    def nonce_of(self, tick: int) -> str:
        return hashlib.sha256(f"{self._salt}|{tick}".encode()).hexdigest()[:10]

    @property
    def current_nonce(self) -> str:
        return self.nonce_of(self.tick)

    @property
    def previous_nonce(self) -> str:
        return self.nonce_of(self.tick - 1)

    @property
    def page_nonce(self) -> str | None:
        """The nonce the chat page shows now (None when the page mode shows none)."""
        mode = self.config.page_mode
        return self.current_nonce if mode == "ok" else self._stale_nonce if mode == "stale" else None

    def nonce_valid(self, nonce: str | None) -> bool:
        tick = self.tick
        return nonce is not None and nonce in (self.nonce_of(tick), self.nonce_of(tick - 1))

    def rotate_nonce(self) -> str:
        """Issue a fresh nonce now; the one before it stays valid, older ones no longer are."""
        self._offset += 1
        self._notify()
        return self.current_nonce

    # --- in-process control ----------------------------------------------------------------------

    def knobs(self) -> dict[str, Any]:
        """The runtime knobs as JSON-ready data (``models`` as a list)."""
        knobs = dataclasses.asdict(self.config)
        del knobs["nonce_seed"]
        knobs["models"] = list(knobs["models"])
        return knobs

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.stats.to_dict(),
            "nonce": self.current_nonce,
            "previous_nonce": self.previous_nonce,
            "page_nonce": self.page_nonce,
            "tick": self.tick,
            "throttle_used": self._throttle.used(self.clock.time()),
            "held": self.gate.held,
            "scripts": self.scripts.pending(),
            "config": self.knobs(),
        }

    def reset(self) -> None:
        """Zero counters, empty the throttle window and the scripts; nonces and held requests stay."""
        self.scripts.clear()
        self.stats.reset()
        self._throttle.clear()
        self._notify()

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change runtime knobs (checked as the constructor checks them); returns all knobs."""
        unknown = sorted(set(changes) - set(RUNTIME_KNOBS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)} cannot be changed at runtime; knobs: {', '.join(RUNTIME_KNOBS)}")
        values = dict(changes)
        if isinstance(values.get("models"), list):
            values["models"] = tuple(values["models"])
        old = self.config
        self.config = dataclasses.replace(old, **values)
        if self.config.page_mode != "stale":
            self._stale_nonce = None
        elif old.page_mode != "stale":
            self._stale_nonce = self.current_nonce
        self._throttle.span = self.config.throttle_window
        self._notify()
        return self.knobs()

    # --- the site --------------------------------------------------------------------------------

    def fetch_page(self) -> tuple[str, str | None]:
        """Count a chat-page fetch; (page mode, nonce the page shows)."""
        self.stats.page_fetches += 1
        self._notify()
        return self.config.page_mode, self.page_nonce

    def _refuse(self, kind: str, message: str = "", mode: str = "", status: int = 200) -> Refusal:
        self.stats.count(kind)
        if kind == "bad_nonce":
            self.stats.bad_nonce += 1
        elif kind == "throttled":
            self.stats.throttled += 1
        self._notify()
        return Refusal(kind, message, mode, status)

    def _scripted(self, outcome: Outcome) -> Refusal:
        kind = outcome.kind
        if kind == "bad_nonce":
            mode = self.config.bad_nonce_mode if outcome["mode"] == "config" else outcome["mode"]
            return self._refuse(kind, BAD_NONCE_MESSAGE, mode)
        if kind == "throttled":
            return self._refuse(kind, THROTTLED_MESSAGE)
        if kind == "http_error":
            return self._refuse(kind, mode=outcome["body"], status=outcome["status"])
        if kind == "success_false":
            return self._refuse(kind, outcome["message"])
        return self._refuse(kind)  # html_200, reset

    def begin(self, form: Mapping[str, str]) -> Refusal | Ticket:
        """Check an ajax request in the site's order; admit it, or refuse it at once."""
        config = self.config
        stats = self.stats
        stats.ajax_requests += 1
        action_ok = form.get("action") == ACTION
        message = form.get("message", "")
        too_long = len(message) > config.max_message_chars
        kept = message[: config.max_message_chars] if too_long and config.message_policy == "truncate" else message
        if action_ok:
            stats.last_message, stats.last_model = kept, form.get("model")
            stats.last_session_id = form.get("session_id")
        outcome = self.scripts.pop(None)
        if outcome is not None and outcome.kind not in _SHAPING:
            return self._scripted(outcome)
        if not action_ok:
            return self._refuse("bad_action")
        if not self.nonce_valid(form.get("nonce")):
            return self._refuse("bad_nonce", BAD_NONCE_MESSAGE, config.bad_nonce_mode)
        if config.throttle_requests is not None:
            now = self.clock.time()
            if self._throttle.wait(now, 1, config.throttle_requests) > 0:
                return self._refuse("throttled", THROTTLED_MESSAGE)
            self._throttle.add(now, 1)
        model = form.get("model", "")
        if model not in config.models:
            return self._refuse("invalid_model", INVALID_MODEL_MESSAGE)
        if too_long:
            if config.message_policy == "reject":
                return self._refuse("too_long", too_long_message(len(message), config.max_message_chars))
            stats.truncated_messages += 1
        if not kept.strip():
            return self._refuse("empty", EMPTY_MESSAGE)
        kind = outcome.kind if outcome is not None else "ok"
        extra = outcome["seconds"] if outcome is not None and kind == "delay" else 0.0
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        self._notify()
        return Ticket(kept, model, form.get("session_id"), reply_text(kept, config.reply_words),
                      config.latency + extra, kind == "hold", kind == "truncate")

    def finish(self, ticket: Ticket, result: str) -> None:
        """Close an admitted request: ``ok``, ``truncate`` (cut on purpose) or ``disconnect``."""
        self.stats.in_flight -= 1
        self.stats.count(result)
        if result == "ok":
            self.stats.ok += 1
        self._notify()
