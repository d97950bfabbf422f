"""Conversation sessions: which account holds a conversation. Pure logic; times are passed in.

A conversation key (``session_key``) maps to a ``Binding``: the account that served the
conversation and, for web upstreams, the upstream chat id and last message id. Later turns go to
the same account; when it cannot serve, the caller rebinds the key to another account (the session
migrates) and the upstream ids are forgotten, since they belong to the old account.

``SessionTable`` keeps the bindings in memory, O(1) per request. A client key holds at most
``max_per_client`` of them: a new conversation beyond that drops the key's least recently used
binding (a binding only buys affinity: that conversation's next turn is placed afresh), so one key
cannot fill the table for all. Whatever must outlive a restart is announced to the ``on_change``
listeners (the write-behind), but a mere ``touch`` on use is announced at most once per
``persist_every`` seconds per binding, so a busy conversation does not cost a database write per
request. The stored copy may therefore lag a little behind the table, which only ever makes it
expire a little sooner.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_TTL = 24 * 3600.0
"""A conversation left alone this long is forgotten."""

PERSIST_EVERY = 60.0
"""A binding that is only being used (not rebound) is written at most this often."""

MAX_KEY_LENGTH = 128
"""The stored key's width; longer session ids and users are shortened to a digest."""

SYSTEM_ROLES = frozenset({"system", "developer"})

SessionListener = Callable[["Binding"], None]


def session_key(*, session_header: str | None, user: str | None, client: str | None,
                messages: list[dict[str, Any]]) -> str:
    """The conversation key of a chat request, by the first rule that applies.

    1. ``h:<client>:<X-Session-Id>``: the client names its conversation.
    2. ``u:<client>:<user>``: the OpenAI ``user`` field.
    3. ``c:<digest>``: the first 32 hex digits of the SHA-256 of the client key's name, the system
       prompt(s) before the first user message, and that first user message (text only).

    ``client`` is the client key's name (None on an open gateway). It scopes every key, so two
    clients that happen to send the same session id or user never share a conversation (nor, on a
    web upstream, each other's upstream chat).

    Chat UIs send no session id, but they resend the whole history on every turn, and its start
    never changes: the digest of the system prompt and the first user message keeps a conversation
    together. Two conversations that start alike share a key, which only keeps them on the same
    account. A UI that trims old turns from what it sends (NextChat keeps the last few by default)
    or stamps the current time into its system prompt yields a new key now and then, and the
    conversation may move to another account: such clients should send ``X-Session-Id`` or
    ``user``.
    """
    header = (session_header or "").strip()
    if header:
        return _scoped("h", client, header)
    if user and user.strip():
        return _scoped("u", client, user)
    system: list[str] = []
    first_user: str | None = None
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "user":
            first_user = _text(message.get("content"))
            break
        if role in SYSTEM_ROLES:
            system.append(_text(message.get("content")))
    return "c:" + _digest({"client": client, "system": system, "user": first_user})


@dataclass(slots=True, kw_only=True)
class Binding:
    """Where a conversation lives. Mutated in place by its ``SessionTable``."""

    key: str
    account: str
    chat_id: str | None = None
    """The upstream's conversation id (web upstreams), valid on ``account`` only."""
    parent_id: str | None = None
    """The upstream's id of the last message, which the next turn continues from."""
    turns: int = 0
    """How many of the conversation's messages (the answer included) the upstream chat holds."""
    last_used: float
    expires_at: float
    client: str | None = None
    """The name of the client key whose conversation it is (None: an open gateway)."""


class SessionTable:
    """The live bindings, by key. ``ttl`` is refreshed by every use; expired bindings are dropped
    lazily by ``get`` and in bulk by ``purge_expired``."""

    def __init__(self, *, ttl: float = DEFAULT_TTL, persist_every: float = PERSIST_EVERY,
                 max_per_client: int | None = None) -> None:
        if ttl <= 0 or persist_every < 0 or (max_per_client is not None and max_per_client < 1):
            raise ValueError("need ttl > 0, persist_every >= 0 and max_per_client >= 1")
        self._ttl = ttl
        self._persist_every = persist_every
        self._max_per_client = max_per_client
        self._bindings: dict[str, Binding] = {}
        self._by_account: dict[str, dict[str, Binding]] = {}
        self._by_client: dict[str | None, OrderedDict[str, Binding]] = {}  # least recently used first
        self._announced: dict[str, float] = {}  # key → when its binding was last handed to the listeners
        self._listeners: list[SessionListener] = []

    @property
    def ttl(self) -> float:
        return self._ttl

    def on_change(self, listener: SessionListener) -> None:
        """Call ``listener(binding)`` whenever a binding must be (re)written to the store. A dropped
        binding is announced with ``expires_at = 0``, so that the stored copy expires too."""
        self._listeners.append(listener)

    def __len__(self) -> int:
        """Bindings held, including expired ones not yet dropped."""
        return len(self._bindings)

    def get(self, key: str, now: float) -> Binding | None:
        """The live binding of ``key``; an expired one is dropped (its stored copy has expired too)."""
        binding = self._bindings.get(key)
        if binding is None:
            return None
        if binding.expires_at <= now:
            self._forget(binding)
            return None
        return binding

    def bind(self, key: str, account: str, now: float, client: str | None = None) -> Binding:
        """Bind ``key`` to ``account``: a new session of ``client`` (which may drop that client's least
        recently used one), or a migration (which forgets the upstream ids of the old account).
        Refreshes the TTL and always announces the binding."""
        binding = self._bindings.get(key)
        if binding is None:
            binding = Binding(key=key, account=account, last_used=now, expires_at=now + self._ttl, client=client)
            self._add(binding)
            self._make_room(client, keep=key)
        else:
            if binding.account != account:
                self._unindex(binding)
                binding.account = account
                binding.chat_id = binding.parent_id = None
                binding.turns = 0
                self._by_account.setdefault(account, {})[key] = binding
            binding.last_used = now
            binding.expires_at = now + self._ttl
            self._used(binding)
        self._announce(binding, now)
        return binding

    def touch(self, binding: Binding, now: float) -> bool:
        """Note a use: refresh the TTL; announce it only if not announced for ``persist_every``.

        False (and nothing done) if the binding is no longer the table's, e.g. dropped meanwhile.
        """
        if self._bindings.get(binding.key) is not binding:
            return False
        binding.last_used = now
        binding.expires_at = now + self._ttl
        self._used(binding)
        if now - self._announced.get(binding.key, -self._persist_every) >= self._persist_every:
            self._announce(binding, now)
        return True

    def set_upstream(self, binding: Binding, chat_id: str | None, parent_id: str | None, now: float, *,
                     turns: int = 0) -> bool:
        """Record the upstream conversation and its last message; refreshes the TTL and announces it.

        False (and nothing done) if the binding is no longer the table's, e.g. dropped meanwhile.
        """
        if self._bindings.get(binding.key) is not binding:
            return False
        binding.chat_id = chat_id
        binding.parent_id = parent_id
        binding.turns = turns
        binding.last_used = now
        binding.expires_at = now + self._ttl
        self._used(binding)
        self._announce(binding, now)
        return True

    def drop(self, key: str) -> Binding | None:
        """Forget ``key`` (e.g. its account was removed, or its client key holds too many) and announce
        it as expired."""
        binding = self._bindings.get(key)
        if binding is None:
            return None
        self._forget(binding)
        binding.expires_at = 0.0
        for listener in self._listeners:
            listener(binding)
        return binding

    def load(self, bindings: Iterable[Binding]) -> None:
        """Take bindings read from the store (at start), least recently used first; a binding already in
        the table wins over an older stored one. Beyond a client's cap its least recently used ones are
        dropped (announced as expired, like any drop)."""
        for binding in bindings:
            held = self._bindings.get(binding.key)
            if held is not None:
                if held.last_used >= binding.last_used:
                    continue
                self._forget(held)
            self._add(binding)
            self._announced[binding.key] = binding.last_used
            self._make_room(binding.client, keep=binding.key)

    def purge_expired(self, now: float) -> int:
        """Drop every expired binding (nothing is announced: the stored copies expire on their own)."""
        expired = [b for b in self._bindings.values() if b.expires_at <= now]
        for binding in expired:
            self._forget(binding)
        return len(expired)

    def for_account(self, name: str) -> list[Binding]:
        """The bindings held for an account (expired ones included until they are dropped)."""
        return list(self._by_account.get(name, {}).values())

    def count_for(self, client: str | None) -> int:
        """How many bindings ``client`` holds (expired ones included until they are dropped)."""
        return len(self._by_client.get(client, ()))

    # --- internals ------------------------------------------------------------------------------

    def _add(self, binding: Binding) -> None:
        self._bindings[binding.key] = binding
        self._by_account.setdefault(binding.account, {})[binding.key] = binding
        self._by_client.setdefault(binding.client, OrderedDict())[binding.key] = binding

    def _used(self, binding: Binding) -> None:
        held = self._by_client.get(binding.client)
        if held is not None and binding.key in held:
            held.move_to_end(binding.key)

    def _make_room(self, client: str | None, *, keep: str) -> None:
        """Drop ``client``'s least recently used bindings beyond the cap (never ``keep``, the newest)."""
        held = self._by_client.get(client)
        if self._max_per_client is None or held is None:
            return
        while len(held) > self._max_per_client:
            oldest = next(iter(held))
            if oldest == keep:
                break
            self.drop(oldest)

    def _announce(self, binding: Binding, now: float) -> None:
        self._announced[binding.key] = now
        for listener in self._listeners:
            listener(binding)

    def _forget(self, binding: Binding) -> None:
        del self._bindings[binding.key]
        self._announced.pop(binding.key, None)
        self._unindex(binding)
        held = self._by_client.get(binding.client)
        if held is not None:
            held.pop(binding.key, None)
            if not held:
                del self._by_client[binding.client]

    def _unindex(self, binding: Binding) -> None:
        keys = self._by_account.get(binding.account)
        if keys is not None:
            keys.pop(binding.key, None)
            if not keys:
                del self._by_account[binding.account]


def _scoped(kind: str, client: str | None, value: str) -> str:
    scope = client or ""
    key = f"{kind}:{scope}:{value}"
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return f"{kind}:{scope[:64]}:#{_digest([scope, value])}"


def _text(content: Any) -> str:
    """The text of a message: a string, or the text parts of a part array joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
    return "\n".join(texts)


def _digest(value: Any) -> str:
    canonical = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]
