"""Adapter for the official Moonshot / Kimi Open Platform API (OpenAI-compatible JSON and SSE).

PROTOCOLS.md §4. Errors are classified on the body's ``type`` first; the message is read only to
pick the window and the seconds to wait.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import orjson

from app.accounts_config import model_id_ok
from app.capabilities import FORCED_TOOL
from app.clock import Clock
from app.errors import (
    AuthDead,
    QuotaExhausted,
    RateLimited,
    Transient,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamOverloaded,
)
from app.kimi_models import moonshot_traits
from app.pool.account import Account
from app.redact import redact
from app.upstreams.base import Batch, ChatRequest, Completion, Delta, Finish, Thread, Usage
from app.upstreams.http import TRANSPORT_ERRORS, send

PASSTHROUGH = (
    "temperature", "top_p", "presence_penalty", "frequency_penalty", "stop", "tool_choice", "response_format",
    "seed", "user", "parallel_tool_calls",
)
K3_EFFORTS = {"low": "low", "medium": "high", "high": "high", "max": "max"}
"""A client's effort → the K3 family's levels (it has no ``medium``: Moonshot runs it as ``high``)."""
_TOOL_KEYS = ("name", "description", "parameters")
"""What a function tool carries to Moonshot (its ``strict`` is not Kimi's)."""
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "partial"})
_PART_KEYS = {"text": ("type", "text"), "image_url": ("type", "image_url"), "video_url": ("type", "video_url")}
_WAIT = re.compile(r"after\s+(\d+(?:\.\d+)?)\s*s", re.IGNORECASE)
_WINDOWS = (
    ("concurrency", re.compile(r"concurrency:?\s*(\d+)", re.IGNORECASE)),
    ("rpm", re.compile(r"\bRPM:?\s*(\d+)")),
    ("tpm", re.compile(r"\bTPM\b.*?limit:?\s*(\d+)")),
)
_DAY = 86_400.0
_CN_OFFSET = 8 * 3600.0
"""Moonshot's daily token window rolls over at midnight in China (UTC+8)."""
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=30.0)
"""A probe is one small GET: it must not wait as long as a chat answer may."""


def sanitize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep only what the Moonshot API understands (drops ``cache_control`` and the like)."""
    out = []
    for message in messages:
        clean = {k: v for k, v in message.items() if k in _MESSAGE_KEYS}
        if clean.get("role") == "developer":
            clean["role"] = "system"
        content = clean.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                keys = _PART_KEYS.get(part.get("type", "text"))
                if keys is not None:
                    parts.append({k: part[k] for k in keys if k in part})
            clean["content"] = parts
        out.append(clean)
    return out


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as Moonshot takes it: the function's name, description and parameters, the schema without
    its ``$schema`` marker (Claude Code puts one in every tool)."""
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        return tool  # a builtin function ($web_search) goes as it is
    clean = {k: function[k] for k in _TOOL_KEYS if k in function}
    parameters = clean.get("parameters")
    if isinstance(parameters, dict) and "$schema" in parameters:
        clean["parameters"] = {k: v for k, v in parameters.items() if k != "$schema"}
    return {"type": "function", "function": clean}


def thinking_fields(request: ChatRequest, model: str) -> dict[str, Any]:
    """How to ask ``model`` for the thinking the request wants: K3 takes ``reasoning_effort``; the K2.5/K2.6
    models take ``thinking`` and have it on by default (off for a turn that forces a tool, which they refuse
    while thinking); models that always or never think take nothing. Never both fields (Moonshot answers 400)."""
    traits = moonshot_traits(model)
    if traits.efforts:
        return {"reasoning_effort": K3_EFFORTS[request.effort]} if request.effort else {}
    if traits.thinking == "default":
        if request.thinking is False or (request.thinking is None and FORCED_TOOL in request.needs):
            return {"thinking": {"type": "disabled"}}
        if request.thinking:
            return {"thinking": {"type": "enabled"}}
    elif traits.thinking == "always" and request.thinking:
        return {"thinking": {"type": "enabled"}}
    return {}


def classify(status: int | None, body: bytes, headers: Any, now: float) -> UpstreamError:
    """Map a non-200 answer (or, with ``status`` None, an error event inside a stream) to the closed set."""
    kind = message = None
    try:
        error = orjson.loads(body)["error"]
        kind, message = error.get("type"), error.get("message")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        pass
    where = "in its stream" if status is None else f"HTTP {status}"
    message = str(message or f"upstream answered {where}")
    if status == 401 or kind in ("invalid_authentication_error", "incorrect_api_key_error"):
        return AuthDead(f"Moonshot rejected the API key: {message}")
    if kind == "exceeded_current_quota_error":
        return QuotaExhausted(f"Moonshot account out of credit: {message}")
    if kind == "engine_overloaded_error":
        return UpstreamOverloaded(message, retry_after=_wait_seconds(message, headers) or 1.0)
    if kind == "rate_limit_reached_error" or status == 429:
        if "TPD" in message:
            day_start = (now + _CN_OFFSET) // _DAY * _DAY - _CN_OFFSET
            return QuotaExhausted(f"daily token limit reached: {message}", until=day_start + _DAY)
        bucket, limit = _window(message)
        return RateLimited(message, retry_after=_wait_seconds(message, headers) or 1.0, bucket=bucket, limit=limit)
    if status is None:  # the answer had begun: whatever it says, this answer is lost, not the request's fault
        return Transient(f"Moonshot ended the stream with an error ({kind or 'no type'}): {message[:200]}")
    if status == 404:
        return UpstreamBadRequest(message, status=404, type="invalid_request_error", code="model_not_found")
    if 400 <= status < 500:
        return UpstreamBadRequest(message, status=status, type=kind or "invalid_request_error")
    return Transient(f"Moonshot upstream error (HTTP {status}): {redact(message)[:200]}")


def _window(message: str) -> tuple[str | None, int | None]:
    """Which window a ``rate_limit_reached_error`` names, and the limit it states."""
    for bucket, pattern in _WINDOWS:
        match = pattern.search(message)
        if match:
            return bucket, int(match.group(1))
    return None, None


def _wait_seconds(message: str, headers: Any) -> float | None:
    match = _WAIT.search(message)
    if match:
        return float(match.group(1))
    if headers is not None:
        value = headers.get("Retry-After")
        if value:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _usage(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    cached = data.get("cached_tokens")
    if cached is None and isinstance(data.get("prompt_tokens_details"), dict):
        cached = data["prompt_tokens_details"].get("cached_tokens")
    return Usage(int(data.get("prompt_tokens") or 0), int(data.get("completion_tokens") or 0), cached)


class MoonshotUpstream:
    kind = "moonshot"

    def __init__(self, session: aiohttp.ClientSession, clock: Clock) -> None:
        self._session = session
        self._clock = clock

    def _body(self, request: ChatRequest, model: str, stream: bool) -> bytes:
        body: dict[str, Any] = {"model": model, "messages": sanitize_messages(request.messages), "stream": stream}
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        params = request.params
        for key in PASSTHROUGH:
            if key in params:
                body[key] = params[key]
        if "tools" in params:
            body["tools"] = [_tool(t) for t in params["tools"]]
        if request.thinking is not None or request.needs or request.effort:
            body.update(thinking_fields(request, model))
        if stream and request.include_usage:
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    def _headers(self, account: Account, stream: bool) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {account.secret}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
        }

    async def _fail(self, response: aiohttp.ClientResponse) -> UpstreamError:
        try:
            body = await response.read()
        except TRANSPORT_ERRORS:
            body = b""
        return classify(response.status, body, response.headers, self._clock.time())

    def _post(self, account: Account, request: ChatRequest, model: str,
              stream: bool) -> Awaitable[aiohttp.ClientResponse]:
        """The chat completion request, giving the response (to use as ``async with``)."""
        return send(self._session, "POST", f"{account.spec.effective_base_url()}/chat/completions", account.name,
                    data=self._body(request, model, stream), headers=self._headers(account, stream),
                    proxy=account.spec.proxy)

    async def _read(self, sending: Awaitable[aiohttp.ClientResponse]) -> bytes:
        """The body of a 200 answer; anything else raised as its classified error."""
        try:
            async with await sending as response:
                if response.status != 200:
                    raise await self._fail(response)
                return await response.read()
        except TRANSPORT_ERRORS as exc:
            raise Transient(f"Moonshot upstream unreachable: {type(exc).__name__}") from None

    async def complete(self, account: Account, request: ChatRequest, model: str,
                       thread: Thread | None = None) -> Completion:
        raw = await self._read(self._post(account, request, model, False))
        try:
            data = orjson.loads(raw)
            choice = data["choices"][0]
            message = choice["message"]
            return Completion(
                content=message.get("content"),
                finish_reason=choice.get("finish_reason") or "stop",
                usage=_usage(data.get("usage")) or _usage(choice.get("usage")),
                reasoning=message.get("reasoning_content"),
                tool_calls=message.get("tool_calls"),
            )
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise Transient("Moonshot answered with a malformed completion body") from None

    async def stream(self, account: Account, request: ChatRequest, model: str,
                     thread: Thread | None = None) -> AsyncIterator[Batch]:
        finished = False
        pending = b""
        try:
            async with await self._post(account, request, model, True) as response:
                if response.status != 200:
                    raise await self._fail(response)
                async for data in response.content.iter_any():
                    *lines, pending = (pending + data).split(b"\n")
                    batch: Batch = []
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            if not finished:
                                raise Transient("Moonshot stream ended without a finish_reason")
                            if batch:
                                yield batch
                            return
                        finished = self._parse(payload, batch, finished)
                    if batch:
                        yield batch
        except TRANSPORT_ERRORS as exc:
            raise Transient(f"Moonshot stream broke: {type(exc).__name__}") from None
        except orjson.JSONDecodeError:
            raise Transient("Moonshot sent a malformed stream chunk") from None
        raise Transient("Moonshot stream was cut before [DONE]")

    def _parse(self, payload: bytes, batch: Batch, finished: bool) -> bool:
        """Append the events of one SSE chunk to ``batch``; return whether the answer has finished."""
        chunk = orjson.loads(payload)
        if "error" in chunk:
            raise classify(None, payload, None, self._clock.time())
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta") or {}
            content = delta.get("content")
            reasoning = delta.get("reasoning_content")
            tool_calls = delta.get("tool_calls")
            if not isinstance(content, str | None) or not isinstance(reasoning, str | None) \
                    or not isinstance(tool_calls, list | None):
                raise Transient("Moonshot sent a malformed stream chunk")
            if content or reasoning or tool_calls:
                batch.append(Delta(content or None, reasoning or None, tool_calls))
            reason = choice.get("finish_reason")
            if reason and not finished:
                finished = True
                batch.append(Finish(reason))
            usage = _usage(choice.get("usage"))
            if usage is not None:
                batch.append(usage)
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            batch.append(usage)
        return finished

    async def probe(self, account: Account) -> None:
        """``GET /users/me/balance`` (PROTOCOLS.md 4.4): free, and it tells a dead key (401) and an
        account out of credit (``available_balance <= 0``) from one that can take requests."""
        url = f"{account.spec.effective_base_url()}/users/me/balance"
        headers = {"Authorization": f"Bearer {account.secret}", "Accept": "application/json"}
        raw = await self._read(send(self._session, "GET", url, account.name, headers=headers,
                                    proxy=account.spec.proxy, timeout=PROBE_TIMEOUT))
        try:
            balance = float(orjson.loads(raw)["data"]["available_balance"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise Transient("Moonshot answered with a malformed balance body") from None
        if balance <= 0:
            raise QuotaExhausted(f"out of credit: balance {balance:g}")

    async def models(self, account: Account) -> tuple[str, ...] | None:
        """``GET /models`` (PROTOCOLS.md 4.4): the ids the key may use, which keep changing upstream."""
        url = f"{account.spec.effective_base_url()}/models"
        headers = {"Authorization": f"Bearer {account.secret}", "Accept": "application/json"}
        raw = await self._read(send(self._session, "GET", url, account.name, headers=headers,
                                    proxy=account.spec.proxy, timeout=PROBE_TIMEOUT))
        try:
            data = orjson.loads(raw)["data"]
            ids = tuple(dict.fromkeys(entry["id"] for entry in data))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise Transient("Moonshot answered with a malformed model list") from None
        if not all(isinstance(model, str) and model_id_ok(model) for model in ids):
            raise Transient("Moonshot's model list has an id kimi-pool cannot use")
        return ids

    async def close(self) -> None:
        return None
