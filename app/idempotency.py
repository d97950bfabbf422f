"""``Idempotency-Key`` on ``POST /v1/chat/completions``: a retry gets the first answer, not a new one.

A key is scoped by the client key's name, so two clients never see each other's answers. The first
request with a key *claims* it; while it runs, a second request with the same key waits for it and
gets its answer, or, if it failed, takes the claim and runs itself. Only a successful answer is
kept (an error is not: a retry should try again), as the ``chat.completion`` JSON, also for a
stream (``Transcript`` assembles it), and is replayed in whichever form the retry asks for.

``stream`` and ``stream_options`` are left out of the request hash: they say how the answer is
delivered, not what was asked, so a retry may switch between the two forms. Any other difference
in the body is a ``422 idempotency_key_mismatch``.

Answers are written through the write-behind (``put_idempotent``), which can read back what it has
not written yet (``idempotent``), so a lookup asks memory first and the database only when memory
has nothing: a request without the header never touches any of this, and one with it costs a
primary-key read unless it is a quick retry.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Protocol

import orjson

from app.clock import Clock
from app.errors import IdempotencyMismatch, InvalidRequest
from app.store.db import Database
from app.store.records import IdempotentAnswer
from app.store.repository import IdempotencyRepository
from app.upstreams.base import Batch, Completion, Delta, Event, Finish, Usage

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
STORED_KEY_LENGTH = 300
"""The length of ``idempotency_keys.key``; a longer scoped key (a long client name and header) keeps the
client's name and the header's SHA-256 instead of the header."""
_DELIVERY = ("stream", "stream_options")
"""Body fields that say how the answer is delivered: not part of the request hash."""


def scoped_key(value: bytes, client: str | None) -> str:
    """The stored key for the header's ``value`` sent by ``client`` (a key name; None on an open gateway)."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if not 0 < len(text) <= MAX_KEY_LENGTH or not text.isprintable():
        raise InvalidRequest(f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.",
                             param=HEADER, code="invalid_idempotency_key")
    scoped = f"{client or ''}:{text}"
    if len(scoped) > STORED_KEY_LENGTH:
        scoped = f"{client or ''}:sha256:{hashlib.sha256(value).hexdigest()}"
    return scoped


def request_hash(body: dict[str, Any]) -> str:
    """SHA-256 (hex) of the request body as canonical JSON (sorted keys), delivery fields left out."""
    canonical = {name: value for name, value in body.items() if name not in _DELIVERY}
    try:
        return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()
    except orjson.JSONEncodeError as exc:  # nested past orjson's limit (254 levels)
        raise InvalidRequest(f"The request body cannot be keyed for Idempotency-Key: {exc}.") from None


class AnswerStore(Protocol):
    """Where answers go to be written, and can be read back until they are (``WriteBehind``)."""

    def put_idempotent(self, answer: IdempotentAnswer) -> None: ...

    def idempotent(self, key: str) -> IdempotentAnswer | None: ...


class Idempotency:
    def __init__(self, db: Database, answers: AnswerStore, clock: Clock, *, ttl: float) -> None:
        self._db = db
        self._answers = answers
        self._clock = clock
        self._ttl = ttl
        self._running: dict[str, _Flight] = {}
        self._waiting = 0
        self._queued = asyncio.Event()  # set whenever a request starts waiting

    @property
    def waiting(self) -> int:
        """How many requests wait for another one with the same key to finish."""
        return self._waiting

    async def wait_waiting(self, count: int) -> None:
        """Return once at least ``count`` requests wait (for tests: no polling)."""
        while self._waiting < count:
            self._queued.clear()
            await self._queued.wait()

    async def claim(self, key: str, request_hash: str) -> Claim:
        """Take ``key`` for a request whose body hashes to ``request_hash``. The claim's ``replay`` is
        the stored answer to send back; if None, this request runs and must ``keep`` its answer (on
        success) and ``release`` the claim (always). Raises ``IdempotencyMismatch`` if the key was
        used with another body."""
        while (flight := self._running.get(key)) is not None:
            _check(flight.request_hash, request_hash)
            self._waiting += 1
            self._queued.set()
            try:
                await flight.done.wait()
            finally:
                self._waiting -= 1
            if flight.answer is not None:
                _check(flight.answer.request_hash, request_hash)
                return Claim(key, request_hash, replay=flight.answer)
            # the request holding the key failed: take it over (or wait for whoever did first)
        flight = self._running[key] = _Flight(request_hash)
        try:
            stored = await self._stored(key)
        except BaseException:
            self._finish(key, flight, None)
            raise
        if stored is None:
            return Claim(key, request_hash, owner=(self, flight))
        self._finish(key, flight, stored)  # anyone who queued up behind this lookup gets it too
        _check(stored.request_hash, request_hash)
        return Claim(key, request_hash, replay=stored)

    async def _stored(self, key: str) -> IdempotentAnswer | None:
        now = self._clock.time()
        answer = self._answers.idempotent(key)
        if answer is not None:
            return answer if answer.expires_at > now else None
        async with self._db.session() as session:
            return await IdempotencyRepository(session).get(key, now)

    def _keep(self, claim: Claim, body: bytes) -> IdempotentAnswer:
        now = self._clock.time()
        answer = IdempotentAnswer(key=claim.key, request_hash=claim.request_hash, status=200, body=body,
                                  created_at=now, expires_at=now + self._ttl)
        self._answers.put_idempotent(answer)
        return answer

    def _finish(self, key: str, flight: _Flight, answer: IdempotentAnswer | None) -> None:
        flight.answer = answer
        flight.done.set()
        if self._running.get(key) is flight:
            del self._running[key]


class Claim:
    """A keyed request's hold on its key (``Idempotency.claim``)."""

    __slots__ = ("_owner", "key", "replay", "request_hash")

    def __init__(self, key: str, request_hash: str, *, replay: IdempotentAnswer | None = None,
                 owner: tuple[Idempotency, _Flight] | None = None) -> None:
        self.key = key
        self.request_hash = request_hash
        self.replay = replay
        """The stored answer to send back instead of running the request."""
        self._owner = owner

    def keep(self, body: bytes) -> None:
        """Store the successful answer (a ``chat.completion`` JSON) and hand it to the waiting retries."""
        owner, self._owner = self._owner, None
        if owner is not None:
            idempotency, flight = owner
            idempotency._finish(self.key, flight, idempotency._keep(self, body))

    def release(self) -> None:
        """Let go of the key; without a ``keep`` before, the next request with it runs (a waiting one first)."""
        owner, self._owner = self._owner, None
        if owner is not None:
            idempotency, flight = owner
            idempotency._finish(self.key, flight, None)


class _Flight:
    """A request running with a key, and what the requests waiting for it will get."""

    __slots__ = ("answer", "done", "request_hash")

    def __init__(self, request_hash: str) -> None:
        self.request_hash = request_hash
        self.answer: IdempotentAnswer | None = None
        self.done = asyncio.Event()


def _check(stored: str, presented: str) -> None:
    if stored != presented:
        raise IdempotencyMismatch(f"This {HEADER} was used with a different request body; use a new key for a "
                                  "new request.", param=HEADER)


# --- a stream's answer, kept as one completion and played back as events ---------------------------


class Transcript:
    """The events of a stream, gathered into the ``Completion`` they amount to."""

    __slots__ = ("_content", "_finish", "_reasoning", "_tools", "_usage")

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tools: dict[int, dict[str, Any]] = {}
        self._finish = "stop"
        self._usage: Usage | None = None

    def add(self, batch: Batch) -> None:
        for event in batch:
            if type(event) is Delta:
                if event.content:
                    self._content.append(event.content)
                if event.reasoning:
                    self._reasoning.append(event.reasoning)
                if event.tool_calls:
                    self._add_tool_calls(event.tool_calls)
            elif type(event) is Finish:
                self._finish = event.reason
            elif type(event) is Usage:
                self._usage = event

    def _add_tool_calls(self, calls: list[dict[str, Any]]) -> None:
        """Merge streamed tool-call pieces by ``index``: ids and types are set, names and arguments grow."""
        for position, call in enumerate(calls):
            whole = self._tools.setdefault(call.get("index", position),
                                           {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            for name in ("id", "type"):
                if call.get(name):
                    whole[name] = call[name]
            function = call.get("function") or {}
            for name in ("name", "arguments"):
                if function.get(name):
                    whole["function"][name] += function[name]

    def completion(self) -> Completion:
        tool_calls = [self._tools[index] for index in sorted(self._tools)] or None
        content = "".join(self._content) if self._content or not tool_calls else None
        return Completion(content=content, finish_reason=self._finish, usage=self._usage,
                          reasoning="".join(self._reasoning) if self._reasoning else None, tool_calls=tool_calls)


def replay_events(body: dict[str, Any]) -> Batch:
    """A stored ``chat.completion`` as the events of a stream: reasoning, then content and tool calls,
    the finish, and the usage."""
    choice = body["choices"][0]
    message = choice["message"]
    events: list[Event] = []
    if message.get("reasoning_content"):
        events.append(Delta(reasoning=message["reasoning_content"]))
    tool_calls = message.get("tool_calls")
    if message.get("content") or tool_calls:
        events.append(Delta(content=message.get("content") or None,
                            tool_calls=[{"index": i, **call} for i, call in enumerate(tool_calls)] if tool_calls
                            else None))
    events.append(Finish(choice["finish_reason"]))
    usage = body.get("usage")
    if usage:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        events.append(Usage(usage["prompt_tokens"], usage["completion_tokens"], cached))
    return events
