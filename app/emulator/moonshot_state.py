"""The Moonshot emulator's state: organizations and their windows, keys, scripts, counters.

``MoonshotEmulator.begin`` runs a chat request through the documented check order (PROTOCOLS.md
4.8) and returns either an immediate ``Answer`` or a ``Ticket`` (the request was admitted and
charged); ``finish`` closes a ticket, however its answer ended. Tests drive the same object through
``script``, ``script_answers``, ``release``, ``wait_for``, ``snapshot``, ``reset`` and ``configure``.

The order: key (401), body (400), model (404), what the request asks beyond text — thinking, tools,
formats, image parts — against the model's traits (400, ``moonshot_asks``), balance (429), limits
(429), overload (429), context length (400). Only then is the request admitted, and only an
admitted request consumes a scripted answer and enters the prompt cache.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import Any

import orjson

from app.clock import Clock
from app.emulator import moonshot_wire as wire
from app.emulator.control import Controls, KeyedQueues, Outcome, OutcomeKinds, Param
from app.emulator.moonshot_answers import ScriptedAnswer, parse_answer
from app.emulator.moonshot_asks import AGENT_FIELDS, Asks, read_asks
from app.emulator.moonshot_config import (
    RUNTIME_KNOBS,
    ModelInfo,
    MoonshotEmulatorConfig,
    Org,
    check_knobs,
    check_org_changes,
    parse_model_list,
)
from app.emulator.moonshot_prompt import Prompt, scan
from app.emulator.moonshot_records import (
    Answer,
    KeyState,
    MoonshotCounters,
    MoonshotStats,
    OrgState,
    Ticket,
)
from app.emulator.moonshot_reply import Composer, WebSearches
from app.emulator.moonshot_turn import Reply, Turn
from app.emulator.stats import bump_status, enter, leave

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
        config = self.config
        self.stats = MoonshotStats({k: MoonshotCounters() for k in config.keys},
                                   {o: MoonshotCounters() for o in config.orgs}, MoonshotCounters())
        self._orgs = {name: OrgState(org, self.stats.orgs[name], config.tpd_window, config.prompt_cache_entries)
                      for name, org in config.orgs.items()}
        self._keys = {key: KeyState(key, self._orgs[org], self.stats.keys[key], self.stats.totals,
                                    config.recorded_requests)
                      for key, org in config.keys.items()}
        self.answers: KeyedQueues[ScriptedAnswer] = KeyedQueues()
        self.searches = WebSearches()
        self.reply = Reply(config.reply_words, config.reasoning_words)
        self.composer = Composer(self.reply, self.searches, config.web_search_tokens)
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
            "keys": {key: {**self.stats.keys[key].to_dict(), "org": state.org.org.name,
                           "recent_requests": list(state.recent)}
                     for key, state in self._keys.items()},
            "orgs": orgs,
            "totals": self.stats.totals.to_dict(),
            "held": self.gate.held,
            "scripts": self.scripts.pending(),
            "answers": self.answers.pending(),
            "config": self.knobs(),
        }

    def knobs(self) -> dict[str, Any]:
        return {**{name: getattr(self.config, name) for name in RUNTIME_KNOBS}, "models": list(self.config.models)}

    def script_answers(self, key: str | None, answers: Any) -> int:
        """Queue scripted answers (``moonshot_answers``) for ``key`` (None: any key), played one per
        admitted request, FIFO; all are checked (``ValueError``) before any is queued."""
        if not isinstance(answers, list):
            raise ValueError("answers must be a list")
        queued = self.answers.extend(key, [parse_answer(raw) for raw in answers])
        self._notify()
        return queued

    def recent_requests(self, key: str) -> list[dict[str, Any]]:
        """The last request bodies sent with ``key`` (``recorded_requests`` of them), newest last."""
        return list(self._keys[key].recent)

    def reset(self) -> None:
        """Zero counters; empty windows, caches, records and scripts; restore balances. Held streams
        stay held."""
        self.scripts.clear()
        self.answers.clear()
        self.searches.clear()
        for key_state in self._keys.values():
            key_state.recent.clear()
        for counters in (*self.stats.keys.values(), *self.stats.orgs.values(), self.stats.totals):
            counters.reset()
        for name, state in self._orgs.items():
            state.org.balance, state.org.suspended = self._initial[name]
            for window in (state.rpm, state.tpm, state.tpd):
                window.clear()
            state.cache.clear()
        self._notify()

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change runtime knobs, organizations (balance, suspended, limits) and the served models (``models``: a
        list of ``--model`` specs, replacing the list, as when Moonshot retires and adds ids); returns the knobs."""
        knobs = {name: value for name, value in changes.items() if name not in ("orgs", "models")}
        check_knobs(knobs)
        org_changes = changes.get("orgs", {})
        check_org_changes(org_changes, self.config.orgs)
        models = parse_model_list(changes["models"]) if "models" in changes else None
        for name, value in knobs.items():
            setattr(self.config, name, value)
        if models is not None:
            self.config.models = models
        for name, change in org_changes.items():
            org = self.config.orgs[name]
            org.balance = float(change.get("balance", org.balance))
            org.suspended = change.get("suspended", org.suspended)
            for bucket, limit in change.get("limits", {}).items():
                setattr(org.limits, bucket, limit)
        if "reply_words" in knobs or "reasoning_words" in knobs:
            self.reply = self.composer.reply = Reply(self.config.reply_words, self.config.reasoning_words)
        self._notify()
        return self.knobs()

    # --- utility routes --------------------------------------------------------------------------

    def org_of(self, key: str | None) -> Org | None:
        state = self._keys.get(key) if key is not None else None
        return state.org.org if state is not None else None

    def models_body(self) -> bytes:
        """The model list with each model's traits: Kimi's capability flags, and the emulator's own
        ``thinking`` mode and ``forced_tool_choice_with_thinking``."""
        return orjson.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": 1_735_689_600, "owned_by": "moonshot",
             "root": name, "parent": None, "context_length": info.context_length,
             "supports_reasoning": info.thinking != "none", "supports_image_in": info.vision,
             "thinking": info.thinking, "forced_tool_choice_with_thinking": info.forced_tools_with_thinking,
             "reasoning_efforts": list(info.efforts)}
            for name, info in self.config.models.items()]})

    # --- chat ------------------------------------------------------------------------------------

    def _answer(self, key: KeyState | None, status: int, type_: str, message: str,
                reason: str | None = None, headers: wire.Headers = ()) -> Answer:
        bump_status(key.groups if key is not None else (self.stats.totals,), status, reason)
        self._notify()
        return Answer(status, wire.error_body(type_, message), wire.JSON_HEADERS + headers)

    def _rate_limited(self, key: KeyState | None, bucket: str, wait: float, limit: int | None,
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

    def _scripted(self, key: KeyState | None, outcome: Outcome) -> Answer | None:
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
        recent = key.recent
        if recent.maxlen and isinstance(body, dict):
            recent.append(body)
        problem, parsed = _parse_chat(body)
        if problem:
            return self._answer(key, 400, "invalid_request_error", wire.invalid_request(problem))
        model_name, messages, stream, max_tokens, include_usage = parsed
        model = self.config.models.get(model_name)
        if model is None:
            return self._answer(key, 404, "resource_not_found_error", wire.model_not_found(model_name))
        shaped = self._shape(key, body, model_name, model, messages)
        if isinstance(shaped, Answer):
            return shaped
        asks, prompt, query = shaped
        org_state = key.org
        org = org_state.org
        if org.suspended:
            return self._answer(key, 429, "exceeded_current_quota_error", wire.EXCEEDED_QUOTA, "quota")
        if org.balance <= 0:
            return self._answer(key, 429, "exceeded_current_quota_error", wire.INSUFFICIENT_BALANCE, "quota")
        prompt_tokens = prompt.tokens if query is None else prompt.tokens + self.config.web_search_tokens
        cost = prompt_tokens + (max_tokens if max_tokens is not None else self.config.default_max_tokens)
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
        if prompt_tokens + (max_tokens or 0) > model.context_length:
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
        cached = org_state.cache.see(prompt.prefixes) if prompt.prefixes else 0
        answer = self.answers.pop(api_key)
        turn = self.reply.turns[False] if asks is None and answer is None else \
            self._turn(asks, answer, messages, query)
        groups = key.groups
        bump_status(groups, 200)
        enter(groups)
        for group in groups:
            group.tokens_charged += cost
        if cached:
            for group in groups:
                group.cached_tokens += cached
        if turn.calls:
            searches = sum(call.type == "builtin_function" for call in turn.calls)
            for group in groups:
                group.tool_calls += len(turn.calls)
                group.web_searches += searches
        self._notify()
        created = int(now)
        self._sequence = (self._sequence + 1) & 0xFFFFFF
        who = wire.Identity(f"chatcmpl-{created:08x}{self._machine}{self._sequence:06x}", created,
                            model_name, self.fingerprint)
        return Ticket(key, who, turn, prompt_tokens, cached, max_tokens, stream, include_usage, outcome, headers)

    def _shape(self, key: KeyState, body: dict[str, Any], model_name: str, model: ModelInfo,
               messages: list[Any]) -> Answer | tuple[Asks | None, Prompt, str | None]:
        """What the request asks beyond plain text, checked (400s), its prompt, and the ``$web_search``
        query its tool result echoes. A plain text request to a model that never thinks skips the checks."""
        last = messages[-1]
        asks: Asks | None = None
        if model.thinking != "none" or last.get("role") == "tool" or last.get("partial") is True \
                or not AGENT_FIELDS.isdisjoint(body):
            problem, asks = read_asks(body, model_name, model, messages)
            if asks is None:
                return self._answer(key, 400, "invalid_request_error", problem)
        tools = asks.tools_json if asks is not None else None
        seed = None
        if self.config.prompt_cache_entries:
            seed = hash(model_name) if tools is None else hash((model_name, tools))
        prompt = scan(messages, tools, seed)
        if prompt.images and not model.vision:
            problem = wire.invalid_request(f"model {model_name} does not support image input")
            return self._answer(key, 400, "invalid_request_error", problem)
        query = self.searches.query(asks.search_id) if asks is not None else None
        return asks, prompt, query

    def _turn(self, asks: Asks | None, answer: ScriptedAnswer | None, messages: list[Any],
              query: str | None) -> Turn:
        if asks is None:
            if answer is None or not answer.says:
                return self.reply.turns[False]
            asks = Asks(False)
        elif asks.plain and query is None and (answer is None or (not answer.says and answer.reasoning is None)):
            return self.reply.turns[asks.thinking]
        return self.composer.compose(asks, answer, messages, query)

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
