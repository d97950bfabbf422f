"""Adapter for the kimi.com web API: Connect streaming over HTTP (PROTOCOLS.md §3).

The credential is the login's ``kimi-auth`` JWT. A chat turn is one request envelope; the answer
is a sequence of data envelopes in an "op + mask" model (``block.text`` appends are the answer,
``block.think`` the reasoning, ``heartbeat`` keep-alives, ``done`` the end of the answer) closed by
an end-of-stream envelope. An answer counts as complete only with both ``done`` and a clean
end-of-stream envelope; anything less is a truncated stream (``Transient``).

Conversations live upstream. When the dispatcher passes the ``Thread`` of a session this account
holds, and the request's messages extend what the chat holds, only the new messages are sent, as a
continuation of the chat's last answer; otherwise a new chat is started with the conversation
replayed into it. Chats made for one-off requests, and chats left behind by failed turns, are
deleted afterwards (``keep_chats = true`` keeps the former).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from app.clock import Clock
from app.errors import AuthDead, ConfigError, RateLimited, Transient, UpstreamBadRequest, UpstreamError
from app.kimi_auth import TokenInfo, read_token
from app.pool.account import Account
from app.redact import redact
from app.upstreams.base import Batch, ChatRequest, Completion, Delta, Finish, Thread
from app.upstreams.connect import EnvelopeReader, FramingError, envelope
from app.upstreams.http import TRANSPORT_ERRORS, send
from app.upstreams.transcript import flatten

log = logging.getLogger("kimi_pool.kimi_web")

CHAT_PATH = "/apiv2/kimi.gateway.chat.v1.ChatService/Chat"
DELETE_PATH = "/apiv2/kimi.chat.v1.ChatService/DeleteChat"
SUBSCRIPTION_PATH = "/apiv2/kimi.gateway.order.v1.SubscriptionService/GetSubscription"
SCENARIOS = {"kimi-k2": "SCENARIO_K2", "kimi-k2.5": "SCENARIO_K2D5", "kimi-k2.6": "SCENARIO_K2D6"}
"""Model ids → kimi.com scenarios; ``-thinking`` after any of them turns thinking on."""
EFFORTS = {"low": "REASONING_EFFORT_LOW", "medium": "REASONING_EFFORT_MEDIUM", "high": "REASONING_EFFORT_HIGH",
           "max": "REASONING_EFFORT_HIGH"}
EXHAUSTED_COOLDOWN = 60.0
"""How long an account told ``resource_exhausted`` rests (doubling while it repeats, up to 5 min)."""
BUSY_COOLDOWN = 2.0
"""How long an account rests when kimi.com says it is still answering another request of it."""
UNARY_TIMEOUT = aiohttp.ClientTimeout(total=30.0)
_CITATION = re.compile("\ue3a0.*?\ue3a8|[\ue3a0-\ue3a8]", re.DOTALL)
"""kimi.com marks inline citations with private-use characters; they mean nothing to a client."""
_FINE_STATUSES = ("generat", "complet", "pending", "wait", "think")


@dataclass(slots=True)
class _Answer:
    """What one exchange learned, as it streams."""

    chat_id: str | None = None
    assistant_id: str | None = None
    done: bool = False
    ended: bool = False
    emitted: bool = False


class _ChatGone(Exception):
    """The chat to continue no longer exists upstream (deleted by its owner)."""


def scenario_of(model: str) -> tuple[str, bool]:
    """The scenario a model id asks for, and whether it asks for thinking."""
    thinking = model.endswith("-thinking")
    base = model.removesuffix("-thinking")
    scenario = SCENARIOS.get(base) or (base if base.startswith("SCENARIO_") else None)
    if scenario is None:
        raise UpstreamBadRequest(f"kimi-web accounts serve no model '{model}'", status=404,
                                 type="invalid_request_error", code="model_not_found")
    return scenario, thinking


def classify(code: str | None, message: str | None, status: int = 200) -> UpstreamError:
    """A Connect error (code, message; the HTTP status for unary or pre-stream errors) → the closed set."""
    text = f"kimi.com: {code or f'HTTP {status}'}: {redact((message or '').strip())[:200]}".rstrip(": ")
    if code in ("unauthenticated", "permission_denied") or status in (401, 403):
        return AuthDead(f"{text} (log in to kimi.com again and update the account's token)")
    if code == "resource_exhausted" or status == 429:
        return RateLimited(text, retry_after=EXHAUSTED_COOLDOWN)
    if code in ("aborted", "already_exists") or status == 409:
        return RateLimited(f"{text} (another answer of this login is still streaming)", retry_after=BUSY_COOLDOWN)
    if code == "invalid_argument" or status == 400:
        return UpstreamBadRequest(text)
    return Transient(text)


def continues(thread: Thread, messages: list[dict[str, Any]]) -> bool:
    """Whether ``messages`` extend the conversation the thread's chat holds."""
    turns = thread.turns
    return bool(thread.chat_id and thread.parent_id and 0 < turns < len(messages)
                and isinstance(messages[turns - 1], dict) and messages[turns - 1].get("role") == "assistant")


class KimiWebUpstream:
    kind = "kimi-web"

    def __init__(self, session: aiohttp.ClientSession, clock: Clock) -> None:
        self._session = session
        self._clock = clock
        self._tokens: dict[str, TokenInfo] = {}
        self._cleanup: set[asyncio.Task[None]] = set()

    # --- the request ---------------------------------------------------------------------------

    def _token(self, account: Account) -> TokenInfo:
        secret = account.secret or ""
        info = self._tokens.get(secret)
        if info is None:
            try:
                info = read_token(secret)
            except ConfigError as exc:
                raise AuthDead(exc.message) from None
            self._tokens[secret] = info
        if info.expired(self._clock.time()):
            raise AuthDead(f"the kimi.com login token expired ({info.describe(self._clock.time())}); "
                           "log in again and update the account")
        return info

    def _headers(self, account: Account, content_type: str) -> dict[str, str]:
        info = self._token(account)
        base = account.spec.effective_base_url()
        headers = {
            "Content-Type": content_type,
            "Authorization": f"Bearer {account.secret}",
            "Origin": base,
            "Referer": f"{base}/",
            "X-Msh-Platform": "web",
            "X-Msh-Version": "1.0.0",
            "X-Language": "zh-CN",
            "R-Timezone": "Asia/Shanghai",
            "X-Traffic-Id": info.user,
        }
        if content_type == "application/connect+json":
            headers["Connect-Protocol-Version"] = "1"
        if info.device_id:
            headers["X-Msh-Device-Id"] = info.device_id
        if info.session_id:
            headers["X-Msh-Session-Id"] = info.session_id
        return headers

    @staticmethod
    def _body(request: ChatRequest, model: str, thread: Thread | None) -> bytes:
        scenario, thinking = scenario_of(model)
        options: dict[str, Any] = {"thinking": thinking or bool(request.thinking)}
        if request.effort in EFFORTS:
            options["reasoning_effort"] = EFFORTS[request.effort]
        new = request.messages[thread.turns:] if thread is not None else request.messages
        message: dict[str, Any] = {"role": "user", "blocks": [{"message_id": "", "text": {"content": flatten(new)}}],
                                   "scenario": scenario}
        body: dict[str, Any] = {"scenario": scenario, "tools": [], "message": message, "options": options}
        if thread is not None:
            body["chat_id"] = thread.chat_id
            message["parent_id"] = thread.parent_id
        return envelope(orjson.dumps(body))

    # --- the answer ----------------------------------------------------------------------------

    async def _exchange(self, account: Account, body: bytes, answer: _Answer,
                        continuing: bool) -> AsyncIterator[Batch]:
        url = account.spec.effective_base_url() + CHAT_PATH
        reader = EnvelopeReader()
        try:
            async with await send(self._session, "POST", url, account.name, data=body, proxy=account.spec.proxy,
                                  headers=self._headers(account, "application/connect+json")) as response:
                if response.status != 200:
                    raise await _unary_error(response)
                async for data in response.content.iter_any():
                    batch: Batch = []
                    for frame in reader.feed(data):
                        try:
                            payload = orjson.loads(frame.data)
                        except orjson.JSONDecodeError:
                            raise Transient("kimi.com sent a frame that is not JSON") from None
                        if frame.end_of_stream:
                            error = payload.get("error") if isinstance(payload, dict) else None
                            if error:
                                code = error.get("code") if isinstance(error, dict) else None
                                if code == "not_found" and continuing and not answer.emitted:
                                    raise _ChatGone()
                                raise classify(code, error.get("message") if isinstance(error, dict) else None)
                            answer.ended = True
                        elif isinstance(payload, dict):
                            self._frame(payload, answer, batch)
                    if batch:
                        answer.emitted = True
                        yield batch
                    if answer.ended:
                        break
        except TRANSPORT_ERRORS as exc:
            where = "before its end-of-stream frame" if answer.emitted else "before any answer"
            raise Transient(f"kimi.com stream was cut {where} ({type(exc).__name__})") from None
        except FramingError as exc:
            raise Transient(f"kimi.com stream framing: {exc}") from None
        if not answer.ended:
            raise Transient("kimi.com stream was cut before its end-of-stream frame")
        if not answer.done:
            raise Transient("kimi.com stream ended without finishing the answer (no done frame)")

    @staticmethod
    def _frame(frame: dict[str, Any], answer: _Answer, batch: Batch) -> None:
        """Append the events of one data frame to ``batch``."""
        if "error" in frame:
            error = frame["error"] if isinstance(frame["error"], dict) else {}
            raise classify(error.get("code"), error.get("message"))
        if "done" in frame:
            if not answer.done:
                answer.done = True
                batch.append(Finish("stop"))
            return
        chat = frame.get("chat")
        if isinstance(chat, dict) and chat.get("id"):
            answer.chat_id = str(chat["id"])
        message = frame.get("message")
        if isinstance(message, dict):
            if message.get("role") == "assistant" and message.get("id"):
                answer.assistant_id = str(message["id"])
            status = str(message.get("status") or "")
            if status and message.get("id") == answer.assistant_id and not any(
                    fine in status.lower() for fine in _FINE_STATUSES):
                raise RateLimited(f"kimi.com stopped the answer with status {status} (usage limit?)",
                                  retry_after=EXHAUSTED_COOLDOWN)
        block = frame.get("block")
        if isinstance(block, dict):
            think = block.get("think")
            if isinstance(think, dict) and think.get("content"):
                batch.append(Delta(reasoning=_CITATION.sub("", str(think["content"]))))
            text = block.get("text")
            if isinstance(text, dict) and text.get("content"):
                content = _CITATION.sub("", str(text["content"]))
                if content:
                    if text.get("flags") == "thinking":
                        batch.append(Delta(reasoning=content))
                    else:
                        batch.append(Delta(content))

    async def stream(self, account: Account, request: ChatRequest, model: str,
                     thread: Thread | None = None) -> AsyncIterator[Batch]:
        thread = thread if thread is not None else Thread()
        continuing = continues(thread, request.messages)
        answer = _Answer()
        try:
            try:
                async for batch in self._exchange(account, self._body(request, model, thread if continuing else None),
                                                  answer, continuing):
                    yield batch
            except _ChatGone:
                log.info("account %s: chat %s is gone upstream; replaying the conversation into a new one",
                         account.name, thread.chat_id)
                continuing, answer = False, _Answer()
                async for batch in self._exchange(account, self._body(request, model, None), answer, False):
                    yield batch
        finally:
            made = answer.chat_id is not None and not (continuing and answer.chat_id == thread.chat_id)
            finished = answer.done and answer.ended
            if finished and answer.chat_id and answer.assistant_id:
                thread.chat_id, thread.parent_id, thread.turns = answer.chat_id, answer.assistant_id, \
                    len(request.messages) + 1
            if made and answer.chat_id and not (finished and (thread.keep or account.spec.extra.get("keep_chats"))):
                self._delete_later(account, answer.chat_id)

    async def complete(self, account: Account, request: ChatRequest, model: str,
                       thread: Thread | None = None) -> Completion:
        content: list[str] = []
        reasoning: list[str] = []
        async for batch in self.stream(account, request, model, thread):
            for event in batch:
                if isinstance(event, Delta):
                    if event.content:
                        content.append(event.content)
                    if event.reasoning:
                        reasoning.append(event.reasoning)
        return Completion(content="".join(content), finish_reason="stop", reasoning="".join(reasoning) or None)

    # --- unary calls ---------------------------------------------------------------------------

    async def _unary(self, account: Account, path: str, body: dict[str, Any]) -> Any:
        url = account.spec.effective_base_url() + path
        try:
            headers = self._headers(account, "application/json")
            async with await send(self._session, "POST", url, account.name, data=orjson.dumps(body), headers=headers,
                                  proxy=account.spec.proxy, timeout=UNARY_TIMEOUT) as response:
                if response.status != 200:
                    raise await _unary_error(response)
                return orjson.loads(await response.read())
        except TRANSPORT_ERRORS as exc:
            raise Transient(f"kimi.com unreachable: {type(exc).__name__}") from None
        except orjson.JSONDecodeError:
            raise Transient("kimi.com answered a body that is not JSON") from None

    def _delete_later(self, account: Account, chat_id: str) -> None:
        task = asyncio.create_task(self._delete(account, chat_id))
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    async def _delete(self, account: Account, chat_id: str) -> None:
        try:
            await self._unary(account, DELETE_PATH, {"chat_id": chat_id})
        except UpstreamError as exc:
            log.info("account %s: could not delete chat %s: %s", account.name, chat_id, exc.message)

    async def probe(self, account: Account) -> None:
        """``GetSubscription``: what kimi.com's own client calls to check that a login is valid."""
        await self._unary(account, SUBSCRIPTION_PATH, {})

    async def models(self, account: Account) -> tuple[str, ...] | None:
        """None: the Connect API does not say which models a login may use (``GetSubscription`` answers the
        user and a membership level, PROTOCOLS.md §3.5), so the configured or default list stands."""
        return None

    async def drain(self) -> None:
        """Wait for the chat deletions under way."""
        while self._cleanup:
            await asyncio.gather(*self._cleanup, return_exceptions=True)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.drain(), timeout=5.0)
        except TimeoutError:
            for task in self._cleanup:
                task.cancel()


async def _unary_error(response: aiohttp.ClientResponse) -> UpstreamError:
    """A non-200 answer: Connect JSON ``{"code", "message"}`` if there is one."""
    try:
        body = orjson.loads(await response.read())
    except (orjson.JSONDecodeError, *TRANSPORT_ERRORS):
        body = None
    if isinstance(body, dict):
        return classify(body.get("code"), body.get("message"), response.status)
    return classify(None, None, response.status)
