"""The kimi.com web emulator's state: tokens seen, chats, quotas, scripts and counters.

``KimiWebEmulator.begin`` runs a Chat request through its checks (content type, envelope, token,
request fields, chat ownership, quota, one stream per user) and returns either an immediate
``Answer`` or a ``Ticket`` (the turn was admitted, its chat and messages recorded); ``finish``
closes a ticket, however its stream ended. ``unary`` answers the plain-JSON RPCs. Tests drive the
same object through ``token``, ``revoke``, ``script``, ``release``, ``wait_for``, ``snapshot``,
``reset`` and ``configure``.

Tokens are HS512 JWTs with the claim set of PROTOCOLS.md 3.1, signed with
``EMULATOR_JWT_SECRET``. Any such token whose ``sub`` is a configured user is accepted until its
``exp`` (read on the injected clock) or its revocation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jwt
import orjson

from app.clock import Clock
from app.emulator import kimi_web_wire as wire
from app.emulator.control import Controls, Outcome
from app.emulator.kimi_web_config import (
    EMULATOR_JWT_SECRET,
    OUTCOME_KINDS,
    RUNTIME_KNOBS,
    Claims,
    KimiWebEmulatorConfig,
    is_number,
    mint_jwt,
)
from app.emulator.kimi_web_records import (
    Answer,
    Ask,
    Chat,
    KimiWebStats,
    Message,
    StreamCounters,
    Ticket,
    error_answer,
    get_field,
    page_of,
    parse_chat,
    zero_counters,
)
from app.emulator.windows import SlidingWindow

# --- the emulator --------------------------------------------------------------------------------


class KimiWebEmulator(Controls):
    """The emulator's whole state (``app.state.emulator``).

    ``chats`` maps chat id → ``Chat``; ``stats`` holds live counters in total and per user;
    ``snapshot()`` is all of it as JSON-ready data. The configuration is frozen: change knobs
    with ``configure`` (or ``POST /__fake/config``).
    """

    def __init__(self, config: KimiWebEmulatorConfig, clock: Clock) -> None:
        super().__init__(OUTCOME_KINDS)
        self.config = config
        self.clock = clock
        self.stats = KimiWebStats(users={user: StreamCounters() for user in config.users})
        self.chats: dict[str, Chat] = {}
        self._users = frozenset(config.users)
        self._quota = {user: SlidingWindow(config.quota_window) for user in config.users}
        self._claims: dict[str, Claims] = {}
        """Tokens seen or minted whose signature and user are good (a cache, and who holds which)."""
        self._revoked_tokens: set[str] = set()
        self._revoked_before: dict[str, float] = {}
        """User → tokens issued before this second are revoked (``revoke(user)``)."""
        self._ids = 0
        self._activity = 0

    # --- in-process control ----------------------------------------------------------------------

    def token(self, user_id: str) -> str:
        """A fresh valid token for a configured user, issued now (by the clock)."""
        if user_id not in self._users:
            raise ValueError(f"unknown user {user_id!r}")
        now = self.clock.time()
        ttl = self.config.token_ttl
        token = mint_jwt(user_id, now=now, ttl=ttl)
        self._claims[token] = Claims(user_id, int(now), int(now + ttl))
        return token

    def revoke(self, token_or_user: str) -> None:
        """Revoke one token, or (given a user id) every token of that user issued so far."""
        user = token_or_user
        if user in self._users:
            self._revoked_before[user] = max(self._revoked_before.get(user, 0.0), math.floor(self.clock.time()))
            self._revoked_tokens.update(token for token, claims in self._claims.items() if claims.user == user)
        else:
            self._revoked_tokens.add(token_or_user)
        self._notify()

    def knobs(self) -> dict[str, Any]:
        return {name: getattr(self.config, name) for name in RUNTIME_KNOBS}

    def snapshot(self) -> dict[str, Any]:
        now = self.clock.time()
        state = self.stats.to_dict()
        for user, counters in state["users"].items():
            counters["quota_used"] = self._quota[user].used(now)
            counters["revoked_before"] = self._revoked_before.get(user)
        return {
            **state,
            "chats": {chat_id: chat.to_dict() for chat_id, chat in self.chats.items()},
            "revoked_tokens": len(self._revoked_tokens),
            "held": self.gate.held,
            "scripts": self.scripts.pending(),
            "config": {"users": list(self.config.users), **self.knobs()},
        }

    def reset(self) -> None:
        """Forget chats, scripts, revocations and quota use; zero counters. Held streams stay held."""
        self.scripts.clear()
        self.chats.clear()
        self._revoked_tokens.clear()
        self._revoked_before.clear()
        for window in self._quota.values():
            window.clear()
        zero_counters(self.stats)
        for counters in self.stats.users.values():
            zero_counters(counters)
        self._notify()

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change runtime knobs (``ValueError`` for unknown ones or bad values); returns the knobs."""
        unknown = sorted(set(changes) - set(RUNTIME_KNOBS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)} cannot be changed at runtime; knobs: {', '.join(RUNTIME_KNOBS)}")
        self.config = dataclasses.replace(self.config, **changes)
        for window in self._quota.values():
            window.span = self.config.quota_window
        self._notify()
        return self.knobs()

    # --- tokens ----------------------------------------------------------------------------------

    def check_token(self, token: str | None) -> tuple[str | None, str]:
        """(user, "") for a good token; (user or None, problem) otherwise.

        The user is named whenever the signature is good and its ``sub`` is configured, so the
        refusal of an expired or revoked token is counted against its user.
        """
        if not token:
            return None, wire.NO_TOKEN
        claims = self._claims.get(token)
        if claims is None:
            try:
                payload = jwt.decode(token, EMULATOR_JWT_SECRET, algorithms=["HS512"], options={
                    "verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_aud": False})
            except jwt.PyJWTError:
                return None, wire.BAD_TOKEN
            user, exp, iat = payload.get("sub"), payload.get("exp"), payload.get("iat", 0)
            if not isinstance(user, str) or user not in self._users or not is_number(exp) or not is_number(iat):
                return None, wire.BAD_TOKEN
            claims = self._claims[token] = Claims(user, iat, exp)
        if token in self._revoked_tokens or claims.iat < self._revoked_before.get(claims.user, -math.inf):
            return claims.user, wire.REVOKED_TOKEN
        if self.clock.time() >= claims.exp:
            return claims.user, wire.EXPIRED_TOKEN
        return claims.user, ""

    # --- Chat ------------------------------------------------------------------------------------

    def _groups(self, user: str | None) -> tuple[StreamCounters, ...]:
        return (self.stats,) if user is None else (self.stats, self.stats.users[user])

    def _refuse(self, user: str | None, code: str, message: str, *, http: bool, status: int | None = None) -> Answer:
        for counters in self._groups(user):
            counters.count(code)
        self._notify()
        if http:
            return Answer(status or wire.CODE_STATUS[code], wire.error_body(code, message))
        return Answer(200, wire.end_frame(code, message), wire.STREAM_HEADERS, stream=True)

    def begin(self, token: str | None, content_type: str, raw: bytes) -> Answer | Ticket:
        """Check a Chat request; admit its turn, or answer at once."""
        user, problem = self.check_token(token)
        for counters in self._groups(user):
            counters.chat_requests += 1
        outcome = self.scripts.pop(token)
        kind = outcome.kind if outcome is not None else "ok"
        if outcome is not None and kind == "http_error":
            return self._refuse(user, outcome["code"], outcome["message"], http=True, status=outcome["status"])
        if content_type != wire.CONNECT_JSON:
            return self._refuse(user, "invalid_argument", f"content-type must be {wire.CONNECT_JSON}",
                                http=True, status=415)
        try:
            body = wire.decode_request(raw)
        except wire.FramingError as exc:
            return self._refuse(user, "invalid_argument", str(exc), http=False)
        if outcome is not None and kind == "unauthenticated":
            problem = problem or wire.BAD_TOKEN
        if problem or user is None:
            mode = outcome["mode"] if outcome is not None and kind == "unauthenticated" else "config"
            mode = self.config.auth_error_mode if mode == "config" else mode
            return self._refuse(user, "unauthenticated", problem, http=mode == "http")
        problem, ask = parse_chat(body)
        if ask is None:
            return self._refuse(user, "invalid_argument", problem, http=False)
        chat: Chat | None = None
        parent_id = ""
        if ask.chat_id:
            chat = self.chats.get(ask.chat_id)
            if chat is None or chat.owner != user:
                return self._refuse(user, "not_found", f"chat {ask.chat_id} not found", http=False)
            if ask.parent_id and not any(message.id == ask.parent_id for message in chat.messages):
                return self._refuse(user, "invalid_argument",
                                    f"parent message {ask.parent_id} is not in chat {chat.id}", http=False)
            parent_id = ask.parent_id or (chat.messages[-1].id if chat.messages else "")
        now = self.clock.time()
        config = self.config
        limited = outcome is not None and kind == "resource_exhausted"
        message = wire.USAGE_LIMIT
        window = self._quota[user]
        if not limited and config.quota_turns is not None:
            wait = window.wait(now, 1, config.quota_turns)
            limited = wait > 0
            message = wire.usage_limit(config.quota_turns, config.quota_window, wait)
        if limited:
            mode = outcome["mode"] if outcome is not None and kind == "resource_exhausted" else "config"
            mode = config.quota_mode if mode == "config" else mode
            if mode != "status":
                return self._refuse(user, "resource_exhausted", message, http=mode == "http")
        counters = self.stats.users[user]
        if config.one_stream_per_user and counters.in_flight > 0:
            return self._refuse(user, "aborted", wire.BUSY, http=False)
        return self._admit(user, ask, chat, parent_id, outcome if kind not in ("ok", "resource_exhausted") else None,
                           limited)

    def _new_id(self, now: float) -> str:
        self._ids += 1
        return wire.xid(now, b"kimiw", self._ids)

    def _admit(self, user: str, ask: Ask, chat: Chat | None, parent_id: str, outcome: Outcome | None,
               limited: bool) -> Ticket:
        now = self.clock.time()
        config = self.config
        new_chat = chat is None
        if chat is None:
            chat = Chat(self._new_id(now), user, now)
            self.chats[chat.id] = chat
            self.stats.chats_created += 1
        turn = 1 + sum(1 for message in chat.messages if message.role == "user")
        question = Message(self._new_id(now), parent_id, "user", ask.prompt, ask.scenario,
                           wire.STATUS_COMPLETED, now)
        reply = Message(self._new_id(now), question.id, "assistant", "", ask.scenario, wire.STATUS_GENERATING, now)
        chat.messages += (question, reply)
        self._activity += 1
        chat.activity = self._activity
        for counters in self._groups(user):
            counters.in_flight += 1
            counters.peak_in_flight = max(counters.peak_in_flight, counters.in_flight)
            if not limited:
                counters.turns += 1
        if limited:
            think, text = [], [wire.USAGE_LIMIT_TEXT]
        else:
            self._quota[user].add(now, 1)
            think = wire.think_pieces(config.think_words) if ask.thinking else []
            text = wire.reply_pieces(turn, config.reply_words)
        self._notify()
        return Ticket(user, chat, new_chat, question, reply, think, text, outcome, limited,
                      wire.title(ask.prompt) if new_chat else chat.name)

    def finish(self, ticket: Ticket, think_sent: int, text_sent: int, result: str, status_sent: bool) -> None:
        """Close an admitted turn: ``completed``, ``no_done``, ``error``, ``dropped`` or ``disconnect``."""
        reply = ticket.reply
        reply.think = "".join(ticket.think[:think_sent])
        reply.content = "".join(ticket.text[:text_sent])
        reply.status = wire.STATUS_COMPLETED if status_sent and not ticket.limited else wire.STATUS_FAILED
        if status_sent and ticket.new_chat and not ticket.limited:
            ticket.chat.name = ticket.name
        for counters in self._groups(ticket.user):
            counters.in_flight -= 1
            if result in ("completed", "no_done"):
                counters.count("resource_exhausted" if ticket.limited else "ok")
                if result == "completed" and not ticket.limited:
                    counters.completed_streams += 1
            elif result == "error":
                assert ticket.outcome is not None
                counters.count(ticket.outcome["code"])
            elif result == "dropped":
                counters.dropped += 1
            else:
                counters.client_disconnects += 1
        self._notify()

    # --- unary RPCs ------------------------------------------------------------------------------

    def unary(self, method: str, token: str | None, content_type: str, raw: bytes) -> Answer:
        """Answer one unary RPC (``DeleteChat``, ``BatchDeleteChats``, ``ListChats``, ``ListMessages``,
        ``GetSubscription``): plain JSON in and out, errors as HTTP statuses."""
        if method in ("DeleteChat", "BatchDeleteChats"):
            self.stats.delete_calls += 1
        elif method == "GetSubscription":
            self.stats.subscription_calls += 1
        else:
            self.stats.list_calls += 1
        self._notify()
        user, problem = self.check_token(token)
        if problem or user is None:
            return error_answer("unauthenticated", problem)
        if content_type != "application/json":
            return error_answer("invalid_argument", "content-type must be application/json", 415)
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            return error_answer("invalid_argument", f"the message is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return error_answer("invalid_argument", "the request must be a JSON object")
        handlers: dict[str, Callable[[str, dict[str, Any]], Answer]] = {
            "DeleteChat": self._delete_chat, "BatchDeleteChats": self._batch_delete_chats,
            "ListChats": self._list_chats, "ListMessages": self._list_messages,
            "GetSubscription": self._get_subscription,
        }
        try:
            answer = handlers[method](user, body)
        except ValueError as exc:
            return error_answer("invalid_argument", str(exc))
        self._notify()
        return answer

    def _owned(self, user: str, chat_id: Any) -> Chat | None:
        chat = self.chats.get(chat_id) if isinstance(chat_id, str) else None
        return chat if chat is not None and chat.owner == user else None

    def _delete(self, chat: Chat) -> None:
        del self.chats[chat.id]
        self.stats.chats_deleted += 1

    def _delete_chat(self, user: str, body: dict[str, Any]) -> Answer:
        chat_id = get_field(body, "chat_id")
        if not isinstance(chat_id, str) or not chat_id:
            raise ValueError("chat_id is required")
        chat = self._owned(user, chat_id)
        if chat is None:
            return error_answer("not_found", f"chat {chat_id} not found")
        self._delete(chat)
        return Answer(200, b"{}")

    def _batch_delete_chats(self, user: str, body: dict[str, Any]) -> Answer:
        """Deletes the caller's chats among ``chat_ids``; other ids are ignored."""
        chat_ids = get_field(body, "chat_ids")
        if not isinstance(chat_ids, list) or not all(isinstance(chat_id, str) for chat_id in chat_ids):
            raise ValueError("chat_ids must be a list of strings")
        for chat_id in dict.fromkeys(chat_ids):
            chat = self._owned(user, chat_id)
            if chat is not None:
                self._delete(chat)
        return Answer(200, b"{}")

    def _list_chats(self, user: str, body: dict[str, Any]) -> Answer:
        """The caller's chats, latest turn first; ``query`` filters names (case-insensitive)."""
        offset, size = page_of(body, 20)
        query = get_field(body, "query") or ""
        if not isinstance(query, str):
            raise ValueError("query must be a string")
        chats = sorted((chat for chat in self.chats.values()
                        if chat.owner == user and query.lower() in chat.name.lower()),
                       key=lambda chat: chat.activity, reverse=True)
        page = chats[offset:offset + size]
        following = str(offset + size) if offset + size < len(chats) else ""
        return Answer(200, orjson.dumps({
            "chats": [{"id": chat.id, "name": chat.name, "createTime": wire.iso(chat.created)} for chat in page],
            "nextPageToken": following}))

    def _list_messages(self, user: str, body: dict[str, Any]) -> Answer:
        """A chat's messages, oldest first."""
        offset, size = page_of(body, 50)
        chat_id = get_field(body, "chat_id")
        chat = self._owned(user, chat_id)
        if chat is None:
            return error_answer("not_found", f"chat {chat_id} not found")
        page = chat.messages[offset:offset + size]
        following = str(offset + size) if offset + size < len(chat.messages) else ""
        return Answer(200, orjson.dumps({"messages": [message.to_wire() for message in page],
                                         "nextPageToken": following}))

    def _get_subscription(self, user: str, body: dict[str, Any]) -> Answer:
        return Answer(200, orjson.dumps({"subscription": {
            "userId": user, "userName": f"Emulated {user}", "membership": {"level": 10}}}))
