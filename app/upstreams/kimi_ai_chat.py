"""Adapter for the kimi-ai.chat site (PROTOCOLS.md §1): a WordPress admin-ajax action behind a nonce.

An account here is an egress identity (a base URL and perhaps a proxy) with its own nonce: the
chat page is fetched, the nonce read from its inline ``var kimi_ajax = {...}``, and kept for the
requests that follow. Concurrent requests that need a nonce share one page fetch. A rejected
nonce (``-1``, or ``success: false`` that is not a throttle message) is refreshed once — one fetch
however many requests saw the rejection — and the request retried once; a fresh nonce rejected
again takes the account out (``AuthDead``). A page without the nonce (a challenge page) is a
failure of the account, which cools down while the request moves on.

The site answers with one JSON body. A streaming client gets it as soon as it arrives, cut into
word-sized chunks written together: no artificial delay. Failures are errors or failovers, never
assistant text.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from app.clock import Clock
from app.errors import AuthDead, RateLimited, Transient, Unsuitable, UpstreamBadRequest
from app.pool.account import Account
from app.redact import redact
from app.upstreams.base import Batch, ChatRequest, Completion, Delta, Finish, Thread
from app.upstreams.http import TRANSPORT_ERRORS, send
from app.upstreams.transcript import flatten

SITE_MODELS = {
    "kimi-k2-instruct-0905": "moonshotai/Kimi-K2-Instruct-0905",
    "kimi-k2-instruct": "moonshotai/Kimi-K2-Instruct",
}
"""Client-facing model ids → the site's. Other ids are sent as they are."""
DEFAULT_MAX_CHARS = 1000
"""The site's message limit as its public clients know it."""
NONCE_MAX_AGE = 6 * 3600.0
"""A nonce older than this is refreshed before use (WordPress honours one for 12 to 24 h)."""
CHALLENGE_COOLDOWN = 60.0
"""How long an account that was shown a challenge page rests (doubling while it repeats)."""
THROTTLE_COOLDOWN = 30.0
USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/131.0.0.0 Safari/537.36")
PAGE_TIMEOUT = aiohttp.ClientTimeout(total=30.0)
_KIMI_AJAX = re.compile(r"var\s+kimi_ajax\s*=\s*(\{.*?\})\s*;", re.DOTALL)
_NONCE = re.compile(r"""["']?nonce["']?\s*:\s*["']([^"']+)["']""")
_THROTTLE = re.compile(r"rate.?limit|throttl|too many|频繁|限流|稍后", re.IGNORECASE)
_TOO_LONG = re.compile(r"too long|too many characters|过长", re.IGNORECASE)
_BAD_MODEL = re.compile(r"model", re.IGNORECASE)
_EMPTY = re.compile(r"empty|为空", re.IGNORECASE)
_WORDS = re.compile(r"\s*\S+\s*|\s+")


class _Rejected(Exception):
    """The site refused the nonce; carries the nonce that was refused."""

    def __init__(self, nonce: str, why: str) -> None:
        super().__init__(why)
        self.nonce = nonce
        self.why = why


@dataclass(slots=True)
class _NonceSlot:
    """One account's nonce, and the page fetch under way, if any."""

    value: str | None = None
    fetched_at: float = 0.0
    fetching: asyncio.Task[str] | None = None
    fetches: int = 0


def parse_nonce(html: str) -> str | None:
    """The nonce of a chat page's ``kimi_ajax`` object; None if the page has none (a challenge)."""
    match = _KIMI_AJAX.search(html)
    if match:
        try:
            value = orjson.loads(match.group(1)).get("nonce")
        except (orjson.JSONDecodeError, AttributeError):
            value = None
        if isinstance(value, str) and value:
            return value
        found = _NONCE.search(match.group(1))
        return found.group(1) if found else None
    return None


def words(text: str) -> list[str]:
    """``text`` cut into word-sized pieces that join back to it exactly."""
    return _WORDS.findall(text)


class KimiAiChatUpstream:
    kind = "kimi-ai-chat"

    def __init__(self, session: aiohttp.ClientSession, clock: Clock) -> None:
        self._session = session
        self._clock = clock
        self._slots: dict[tuple[str, str, str | None], _NonceSlot] = {}

    # --- the nonce manager ---------------------------------------------------------------------

    def _slot(self, account: Account) -> _NonceSlot:
        key = (account.name, account.spec.effective_base_url(), account.spec.proxy)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _NonceSlot()
        return slot

    def page_fetches(self, account: Account) -> int:
        """How many times this account's chat page has been fetched (for status and tests)."""
        return self._slot(account).fetches

    async def nonce(self, account: Account, *, rejected: str | None = None) -> str:
        """The account's nonce: the cached one, unless it is old or is the ``rejected`` one; then one
        page fetch, shared by every request that asks meanwhile."""
        slot = self._slot(account)
        fresh = slot.value is not None and self._clock.time() - slot.fetched_at < NONCE_MAX_AGE
        if slot.value is not None and fresh and slot.value != rejected:
            return slot.value
        if slot.fetching is None:
            slot.fetching = asyncio.create_task(self._fetch(account, slot))
            slot.fetching.add_done_callback(_retrieve)  # every waiter may have gone: never an unread error
        # shield: a client that goes away does not cancel the fetch the others wait for
        return await asyncio.shield(slot.fetching)

    async def _fetch(self, account: Account, slot: _NonceSlot) -> str:
        base = account.spec.effective_base_url()
        slot.fetches += 1
        try:
            async with await send(self._session, "GET", f"{base}/chat/", account.name, headers=self._page_headers(base),
                                  proxy=account.spec.proxy, timeout=PAGE_TIMEOUT) as response:
                html = await response.text(errors="replace")
                status = response.status
        except TRANSPORT_ERRORS as exc:
            raise Transient(f"kimi-ai.chat chat page unreachable: {type(exc).__name__}") from None
        finally:
            slot.fetching = None
        nonce = parse_nonce(html) if status == 200 else None
        if nonce is None:
            what = f"HTTP {status}" if status != 200 else "no kimi_ajax nonce in it"
            raise RateLimited(f"kimi-ai.chat showed this account a challenge page instead of the chat ({what})",
                              retry_after=CHALLENGE_COOLDOWN)
        slot.value, slot.fetched_at = nonce, self._clock.time()
        return nonce

    @staticmethod
    def _page_headers(base: str) -> dict[str, str]:
        return {
            "User-Agent": USER_AGENT,
            "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            "Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8",
            "Referer": f"{base}/chat/",
        }

    # --- one exchange --------------------------------------------------------------------------

    def _form(self, account: Account, request: ChatRequest, model: str, nonce: str) -> dict[str, str]:
        limit = account.spec.extra.get("max_message_chars", DEFAULT_MAX_CHARS)
        millis = int(self._clock.time() * 1000)
        return {
            "action": "kimi_send_message",
            "nonce": nonce,
            "message": flatten(request.messages, limit=limit),
            "model": SITE_MODELS.get(model, model),
            "session_id": f"session_{millis}_{_base36(secrets.randbits(48))[:9]}",
        }

    async def _ask(self, account: Account, form: dict[str, str]) -> str:
        """Post one question; the answer's text, or ``_Rejected`` / the classified error."""
        base = account.spec.effective_base_url()
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json, text/javascript, */*; q=0.01",
            "X-Requested-With": "XMLHttpRequest",
            "Origin": base,
            "Referer": f"{base}/chat/",
        }
        try:
            async with await send(self._session, "POST", f"{base}/wp-admin/admin-ajax.php", account.name, data=form,
                                  headers=headers, proxy=account.spec.proxy) as response:
                status = response.status
                body = await response.read()
        except TRANSPORT_ERRORS as exc:
            raise Transient(f"kimi-ai.chat unreachable or cut the answer: {type(exc).__name__}") from None
        return self._answer(status, body, form["nonce"])

    @staticmethod
    def _answer(status: int, body: bytes, nonce: str) -> str:
        text = body.strip()
        if text == b"-1":
            raise _Rejected(nonce, f"the site answered -1 (HTTP {status})")
        if status >= 500:
            raise Transient(f"kimi-ai.chat answered HTTP {status}")
        if text == b"0":
            raise Transient(f"kimi-ai.chat does not know the chat action (answered 0, HTTP {status})")
        try:
            data: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            if text[:1] == b"<":
                raise RateLimited(f"kimi-ai.chat answered an HTML page (HTTP {status}), not JSON: a challenge?",
                                  retry_after=CHALLENGE_COOLDOWN) from None
            raise Transient(f"kimi-ai.chat answered a body that is not JSON (HTTP {status})") from None
        if not isinstance(data, dict):
            raise Transient("kimi-ai.chat answered JSON of an unexpected shape")
        if data.get("success") is True:
            message = data.get("data", {}).get("message") if isinstance(data.get("data"), dict) else None
            if isinstance(message, str):
                return message
            raise Transient("kimi-ai.chat answered success without a message")
        why = data.get("data")
        why = redact(why if isinstance(why, str) else orjson.dumps(why).decode())  # before it is cut to 200
        if _THROTTLE.search(why):
            raise RateLimited(f"kimi-ai.chat throttled this account: {why[:200]}", retry_after=THROTTLE_COOLDOWN)
        if _TOO_LONG.search(why):
            raise Unsuitable(f"kimi-ai.chat refused the message as too long: {why[:200]}")
        if _EMPTY.search(why):
            raise UpstreamBadRequest(f"kimi-ai.chat refused the message: {why[:200]}")
        if _BAD_MODEL.search(why):
            raise Transient(f"kimi-ai.chat does not know the model sent (check the account's models): {why[:200]}")
        raise _Rejected(nonce, f"success: false ({why[:200]})")

    async def complete(self, account: Account, request: ChatRequest, model: str,
                       thread: Thread | None = None) -> Completion:
        form = self._form(account, request, model, await self.nonce(account))
        try:
            text = await self._ask(account, form)
        except _Rejected as first:
            form["nonce"] = await self.nonce(account, rejected=first.nonce)
            try:
                text = await self._ask(account, form)
            except _Rejected as second:
                raise AuthDead(f"kimi-ai.chat rejected a freshly fetched nonce: {first.why}, then {second.why}") \
                    from None
        return Completion(content=text, finish_reason="stop")

    async def stream(self, account: Account, request: ChatRequest, model: str,
                     thread: Thread | None = None) -> AsyncIterator[Batch]:
        completion = await self.complete(account, request, model, thread)
        batch: Batch = [Delta(piece) for piece in words(completion.content or "")]
        batch.append(Finish("stop"))
        yield batch

    async def probe(self, account: Account) -> None:
        """Fetch the chat page afresh: the account works if the page carries a nonce."""
        slot = self._slot(account)
        await self.nonce(account, rejected=slot.value)

    async def models(self, account: Account) -> tuple[str, ...] | None:
        """None: the site serves one chat page and lists no models; the configured or default list stands."""
        return None

    async def close(self) -> None:
        for slot in self._slots.values():
            if slot.fetching is not None:
                slot.fetching.cancel()


def _retrieve(task: asyncio.Task[str]) -> None:
    if not task.cancelled():
        task.exception()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while number:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
    return out or "0"
