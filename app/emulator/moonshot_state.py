"""The Moonshot emulator's state: organizations and their windows, keys, scripts, counters.

``MoonshotEmulator.begin`` runs a chat request through the documented check order (PROTOCOLS.md
4.8) and returns either an immediate ``Answer`` or a ``Ticket`` (the request was admitted and
charged); ``finish`` closes a ticket, however its answer ended. Tests drive the same object through
``script``, ``release``, ``wait_for``, ``snapshot``, ``reset`` and ``configure``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from app.clock import Clock
from app.emulator import moonshot_wire as wire
from app.emulator.control import Controls, Outcome, OutcomeKinds, Param
from app.emulator.moonshot_config import (
    RUNTIME_KNOBS,
    MoonshotEmulatorConfig,
    Org,
    check_knobs,
    check_org_changes,
)
from app.emulator.stats import Counters, bump_status, enter, leave
from app.emulator.windows import DayWindow, SlidingWindow

BUCKETS = ("concurrency", "rpm", "tpm", "tpd")

OUTCOME_KINDS: OutcomeKinds = {
    "ok": {},
    "rate_limit": {"bucket": Param("rpm", choices=BUCKETS), "wait": Param(1.0)},
    "auth": {},
    "quota": {},
    "overloaded": {},
    "status": {"status": Param(500, minimum=400, maximum=599), "type": Param("server_error"),
               "message": Param(wire.SERVER_ERROR)},
    "html_504": {},
    "server_error": {},
    "drop_after": {"chunks": Param(0)},
    "error_chunk_after": {"chunks": Param(0), "type": Param("server_error"),
                          "message": Param(wire.STREAM_ERROR)},
    "delay_first_token": {"seconds": Param(0.0)},
    "hold_after": {"chunks": Param(0)},
}
"""Scriptable outcomes and their parameters (with defaults)."""


@dataclass(slots=True)
class Answer:
    """An immediate answer: an error, or a utility route's body."""

    status: int
    body: bytes
    headers: wire.Headers = wire.JSON_HEADERS


@dataclass(slots=True)
class MoonshotStats:
    keys: dict[str, Counters]
    orgs: dict[str, Counters]
    totals: Counters


class _OrgState:
    __slots__ = ("counters", "org", "rpm", "tpd", "tpm")

    def __init__(self, org: Org, counters: Counters, tpd_window: str) -> None:
        self.org = org
        self.counters = counters
        self.rpm = SlidingWindow(60.0)
        self.tpm = SlidingWindow(60.0)
        self.tpd: SlidingWindow | DayWindow = (
            SlidingWindow(86_400.0) if tpd_window == "rolling" else DayWindow())


class _KeyState:
    __slots__ = ("groups", "org", "who")

    def __init__(self, key: str, org: _OrgState, counters: Counters, totals: Counters) -> None:
        self.org = org
        self.who = f"{org.org.name}<ak-{hashlib.sha256(key.encode()).hexdigest()[:20]}>"
        self.groups = (counters, org.counters, totals)


@dataclass(slots=True)
class Ticket:
    """An admitted chat request: charged to its organization's windows and counted in flight."""

    key: _KeyState
    who: wire.Identity
    thinking: bool
    prompt_tokens: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    outcome: Outcome | None
    headers: wire.Headers
    """Extra response headers (``X-RateLimit-*`` when that knob is on)."""


class MoonshotEmulator(Controls):
    """The emulator's whole state (``app.state.emulator``).

    It works on its own copy of the configuration: change knobs and organizations at runtime with
    ``configure`` (or ``POST /__fake/config``). ``stats`` holds live counters per key, per
    organization and in total; ``snapshot()`` is the same as JSON-ready data.
    """

    def __init__(self, config: MoonshotEmulatorConfig, clock: Clock) -> None:
        super().__init__(OUTCOME_KINDS)
        self.config = copy.deepcopy(config)
        self.clock = clock
        self._initial = {name: (org.balance, org.suspended) for name, org in self.config.orgs.items()}
        self.stats = MoonshotStats({k: Counters() for k in self.config.keys},
                                   {o: Counters() for o in self.config.orgs}, Counters())
        self._orgs = {name: _OrgState(org, self.stats.orgs[name], self.config.tpd_window)
                      for name, org in self.config.orgs.items()}
        self._keys = {key: _KeyState(key, self._orgs[org], self.stats.keys[key], self.stats.totals)
                      for key, org in self.config.keys.items()}
        self.reply = wire.Reply(self.config.reply_words, self.config.reasoning_words)
        self._machine = os.urandom(5).hex()
        self._sequence = 0
        self.fingerprint = "fpv0_" + os.urandom(4).hex()

    # --- in-process control ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self.clock.time()
        orgs = {}
        for name, state in self._orgs.items():
            org = state.org
            orgs[name] = {
                **state.counters.to_dict(), "balance": org.balance, "suspended": org.suspended,
                "limits": {b: getattr(org.limits, b) for b in BUCKETS},
                "window": {name: window.used(now) for name, window in
                           (("rpm", state.rpm), ("tpm", state.tpm), ("tpd", state.tpd))},
            }
        return {
            "keys": {key: {**self.stats.keys[key].to_dict(), "org": state.org.org.name}
                     for key, state in self._keys.items()},
            "orgs": orgs,
            "totals": self.stats.totals.to_dict(),
            "held": self.gate.held,
            "scripts": self.scripts.pending(),
            "config": self.knobs(),
        }

    def knobs(self) -> dict[str, Any]:
        return {name: getattr(self.config, name) for name in RUNTIME_KNOBS}

    def reset(self) -> None:
        """Zero counters, empty windows and scripts, restore balances; held streams stay held."""
        self.scripts.clear()
        for counters in (*self.stats.keys.values(), *self.stats.orgs.values(), self.stats.totals):
            counters.reset()
        for name, state in self._orgs.items():
            state.org.balance, state.org.suspended = self._initial[name]
            for window in (state.rpm, state.tpm, state.tpd):
                window.clear()
        self._notify()

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change runtime knobs and organizations (balance, suspended, limits); returns the knobs."""
        knobs = {name: value for name, value in changes.items() if name != "orgs"}
        check_knobs(knobs)
        org_changes = changes.get("orgs", {})
        check_org_changes(org_changes, self.config.orgs)
        for name, value in knobs.items():
            setattr(self.config, name, value)
        for name, change in org_changes.items():
            org = self.config.orgs[name]
            org.balance = float(change.get("balance", org.balance))
            org.suspended = change.get("suspended", org.suspended)
            for bucket, limit in change.get("limits", {}).items():
                setattr(org.limits, bucket, limit)
        if "reply_words" in knobs or "reasoning_words" in knobs:
            self.reply = wire.Reply(self.config.reply_words, self.config.reasoning_words)
        self._notify()
        return self.knobs()

    # --- utility routes --------------------------------------------------------------------------

    def org_of(self, key: str | None) -> Org | None:
        state = self._keys.get(key) if key is not None else None
        return state.org.org if state is not None else None

    def models_body(self) -> bytes:
        return orjson.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": 1_735_689_600, "owned_by": "moonshot",
             "root": name, "parent": None, "context_length": info.context_length,
             "supports_reasoning": info.thinking}
            for name, info in self.config.models.items()]})

    # --- chat ------------------------------------------------------------------------------------

    def _answer(self, key: _KeyState | None, status: int, type_: str, message: str,
                reason: str | None = None, headers: wire.Headers = ()) -> Answer:
        bump_status(key.groups if key is not None else (self.stats.totals,), status, reason)
        self._notify()
        return Answer(status, wire.error_body(type_, message), wire.JSON_HEADERS + headers)

    def _rate_limited(self, key: _KeyState | None, bucket: str, wait: float, limit: int | None,
                      used: int | None, cost: int) -> Answer:
        """A 429 for ``bucket``; ``used=None`` (scripted) reads as "the window is full"."""
        limit = wire.RATE_LIMIT_DEFAULTS[bucket] if limit is None else limit
        used = limit if used is None else used
        seconds = max(1, math.ceil(wait))
        who = key.who if key is not None else "unknown"
        current = used + cost if bucket in ("tpm", "tpd") else used
        headers: wire.Headers = ()
        if self.config.rate_limit_headers:
            headers = ((b"retry-after", b"%d" % seconds), (b"x-ratelimit-limit", b"%d" % limit),
                       (b"x-ratelimit-remaining", b"%d" % max(0, limit - used)),
                       (b"x-ratelimit-reset", b"%d" % seconds))
        message = wire.rate_limit_message(who, bucket, limit, current, seconds)
        return self._answer(key, 429, "rate_limit_reached_error", message, bucket, headers)

    def _scripted(self, key: _KeyState | None, outcome: Outcome) -> Answer | None:
        """The answer a scripted refusal gives, or None for outcomes that shape an admitted reply."""
        kind = outcome.kind
        if kind == "rate_limit":
            bucket = outcome["bucket"]
            limit = getattr(key.org.org.limits, bucket) if key is not None else None
            return self._rate_limited(key, bucket, outcome["wait"], limit, None, 0)
        if kind == "auth":
            return self._answer(key, 401, "invalid_authentication_error", wire.INVALID_AUTH)
        if kind == "quota":
            return self._answer(key, 429, "exceeded_current_quota_error", wire.EXCEEDED_QUOTA, "quota")
        if kind == "overloaded":
            return self._answer(key, 429, "engine_overloaded_error", wire.OVERLOADED, "overloaded")
        if kind == "status":
            return self._answer(key, outcome["status"], outcome["type"], outcome["message"])
        if kind == "server_error":
            return self._answer(key, 500, "server_error", wire.SERVER_ERROR)
        if kind == "html_504":
            bump_status(key.groups if key is not None else (self.stats.totals,), 504)
            self._notify()
            return Answer(504, wire.GATEWAY_TIMEOUT_PAGE, wire.HTML_HEADERS)
        return None

    def begin(self, api_key: str | None, raw: bytes) -> Answer | Ticket:
        """Check a chat request in the documented order; admit and charge it, or answer at once."""
        key = self._keys.get(api_key) if api_key is not None else None
        outcome = self.scripts.pop(api_key)
        if outcome is not None:
            scripted = self._scripted(key, outcome)
            if scripted is not None:
                return scripted
            if outcome.kind == "ok":
                outcome = None
        if key is None:
            return self._answer(None, 401, "invalid_authentication_error", wire.INVALID_AUTH)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problem = wire.invalid_request("the body is not valid JSON")
            return self._answer(key, 400, "invalid_request_error", problem)
        problem, parsed = _parse_chat(body)
        if problem:
            return self._answer(key, 400, "invalid_request_error", wire.invalid_request(problem))
        model_name, messages, stream, max_tokens, include_usage = parsed
        model = self.config.models.get(model_name)
        if model is None:
            return self._answer(key, 404, "resource_not_found_error", wire.model_not_found(model_name))
        org_state = key.org
        org = org_state.org
        if org.suspended:
            return self._answer(key, 429, "exceeded_current_quota_error", wire.EXCEEDED_QUOTA, "quota")
        if org.balance <= 0:
            return self._answer(key, 429, "exceeded_current_quota_error", wire.INSUFFICIENT_BALANCE, "quota")
        prompt = wire.estimate_tokens(messages)
        cost = prompt + (max_tokens if max_tokens is not None else self.config.default_max_tokens)
        now = self.clock.time()
        limits = org.limits
        counters = org_state.counters
        if limits.concurrency is not None and counters.in_flight >= limits.concurrency:
            return self._rate_limited(key, "concurrency", 1.0, limits.concurrency, counters.in_flight, 0)
        if limits.rpm is not None and (wait := org_state.rpm.wait(now, 1, limits.rpm)) > 0:
            return self._rate_limited(key, "rpm", wait, limits.rpm, org_state.rpm.used(now), 1)
        if limits.tpm is not None and (wait := org_state.tpm.wait(now, cost, limits.tpm)) > 0:
            return self._rate_limited(key, "tpm", wait, limits.tpm, org_state.tpm.used(now), cost)
        if limits.tpd is not None and (wait := org_state.tpd.wait(now, cost, limits.tpd)) > 0:
            return self._rate_limited(key, "tpd", wait, limits.tpd, org_state.tpd.used(now), cost)
        if self.config.overloaded:
            return self._answer(key, 429, "engine_overloaded_error", wire.OVERLOADED, "overloaded")
        if prompt + (max_tokens or 0) > model.context_length:
            problem = wire.context_exceeded(model.context_length)
            return self._answer(key, 400, "invalid_request_error", problem)
        if outcome is not None and outcome.kind == "error_chunk_after" and not stream:
            return self._answer(key, 500, outcome["type"], outcome["message"])
        # Admitted: charge the windows, count it in flight.
        headers: wire.Headers = ()
        if limits.rpm is not None:
            org_state.rpm.add(now, 1)
            if self.config.rate_limit_headers:
                headers = ((b"x-ratelimit-limit", b"%d" % limits.rpm),
                           (b"x-ratelimit-remaining", b"%d" % max(0, limits.rpm - org_state.rpm.used(now))),
                           (b"x-ratelimit-reset", b"%d" % math.ceil(org_state.rpm.reset_in(now))))
        if limits.tpm is not None:
            org_state.tpm.add(now, cost)
        if limits.tpd is not None:
            org_state.tpd.add(now, cost)
        groups = key.groups
        bump_status(groups, 200)
        enter(groups)
        for group in groups:
            group.tokens_charged += cost
        self._notify()
        created = int(now)
        self._sequence = (self._sequence + 1) & 0xFFFFFF
        who = wire.Identity(f"chatcmpl-{created:08x}{self._machine}{self._sequence:06x}", created,
                            model_name, self.fingerprint)
        return Ticket(key, who, model.thinking, prompt, max_tokens, stream, include_usage, outcome, headers)

    def finish(self, ticket: Ticket, completion_tokens: int, result: str) -> None:
        """Close an admitted request: ``completed``, ``disconnect``, ``dropped`` or ``error``."""
        used = ticket.prompt_tokens + completion_tokens
        groups = ticket.key.groups
        leave(groups)
        for group in groups:
            group.tokens_used += used
            if result == "completed":
                group.completed += 1
                if ticket.stream:
                    group.completed_streams += 1
            elif result == "disconnect":
                group.client_disconnects += 1
            elif result == "dropped":
                group.dropped += 1
        ticket.key.org.org.balance -= used * self.config.price_per_1k_tokens / 1000
        self._notify()


def _parse_chat(body: Any) -> tuple[str, tuple[str, list[Any], bool, int | None, bool]]:
    """(problem, ("", …)) or ("", (model, messages, stream, max_tokens, include_usage))."""
    empty: tuple[str, list[Any], bool, int | None, bool] = ("", [], False, None, False)
    if not isinstance(body, dict):
        return "the body must be a JSON object", empty
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "model is required", empty
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty array", empty
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "each message must be an object with a role", empty
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return "stream must be a boolean", empty
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        return "max_tokens must be a positive integer", empty
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return "", (model, messages, bool(stream), max_tokens, include_usage)
