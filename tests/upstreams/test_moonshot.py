"""The Moonshot adapter: error classification (PROTOCOLS.md §4.6) and the per-account proxy."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from app.accounts_config import make_account_spec
from app.clock import ManualClock
from app.errors import (
    AuthDead,
    QuotaExhausted,
    RateLimited,
    Transient,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamOverloaded,
)
from app.pool.account import Account
from app.upstreams.moonshot import MoonshotUpstream, classify, sanitize_messages
from tests.conftest import run_stack, serve

NOW = 1_760_000_000.0  # 2025-10-09 08:53:20 UTC


def body(type_: str, message: str) -> bytes:
    return orjson.dumps({"error": {"type": type_, "message": message}})


@pytest.mark.parametrize(("status", "raw", "expected", "check"), [
    (401, body("invalid_authentication_error", "Invalid Authentication"), AuthDead, None),
    (401, body("incorrect_api_key_error", "Incorrect API key provided"), AuthDead, None),
    (429, body("rate_limit_reached_error",
               "Your account org-1<ak-1> request reached organization max RPM: 3, please try again after 17 seconds"),
     RateLimited, lambda e: e.retry_after == 17),
    (429, body("rate_limit_reached_error",
               "request reached max organization concurrency: 1, please try again after 1 seconds"),
     RateLimited, lambda e: e.retry_after == 1),
    (429, body("rate_limit_reached_error",
               "Your account request reached organization TPD rate limit, current: 1500100, limit: 1500000"),
     QuotaExhausted, lambda e: e.until == 1_760_025_600.0),  # next midnight in UTC+8
    (429, body("exceeded_current_quota_error", "Your account is suspended due to insufficient balance"),
     QuotaExhausted, lambda e: e.until is None and e.retryable),
    (429, body("engine_overloaded_error", "The engine is currently overloaded, please try again later"),
     UpstreamOverloaded, None),
    (400, body("content_filter", "The request was rejected because it was considered high risk"),
     UpstreamBadRequest, lambda e: e.status == 400 and not e.retryable),
    (404, body("resource_not_found_error", "Not found the model kimi-x or Permission denied"),
     UpstreamBadRequest, lambda e: e.status == 404 and e.code == "model_not_found"),
    (500, body("server_error", "internal"), Transient, None),
    (503, body("server_unavailable", "maintenance"), Transient, None),
    (504, b"<html><body><h1>504 Gateway Time-out</h1></body></html>", Transient, None),
])
def test_upstream_answers_are_classified_on_type_first(status: int, raw: bytes, expected: type[UpstreamError],
                                                       check: object) -> None:
    error = classify(status, raw, {}, NOW)
    assert type(error) is expected
    if callable(check):
        assert check(error)


def test_retry_after_header_is_used_when_the_message_has_no_wait() -> None:
    error = classify(429, body("rate_limit_reached_error", "slow down"), {"Retry-After": "9"}, NOW)
    assert isinstance(error, RateLimited) and error.retry_after == 9


def test_what_moonshot_does_not_understand_is_dropped() -> None:
    messages = [
        {"role": "developer", "content": "rules", "cache_control": {"type": "ephemeral"}},
        {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}, {"type": "input_audio"}]},
    ]
    assert sanitize_messages(messages) == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]


def forward_proxy(seen: list[str]) -> Starlette:
    """A plain HTTP forward proxy, the remote peer an operator would put in ``proxy = …``."""

    async def forward(request: Request) -> StreamingResponse:
        target = f"http://{request.headers['host']}{request.url.path}"
        seen.append(target)
        session = aiohttp.ClientSession()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "proxy-connection")}
        upstream = await session.post(target, data=await request.body(), headers=headers)

        async def relay():  # type: ignore[no-untyped-def]
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            finally:
                upstream.release()
                await session.close()

        return StreamingResponse(relay(), status_code=upstream.status,
                                 media_type=upstream.headers.get("content-type"))

    return Starlette(routes=[Route("/{path:path}", forward, methods=["POST"])])


async def test_each_account_goes_out_through_its_own_proxy(tmp_path: Path) -> None:
    seen: list[str] = []
    async with serve(forward_proxy(seen)) as proxy_url:
        async with run_stack(tmp_path, keys=["sk-emu-0001"], account_extra={"proxy": proxy_url}) as stack:
            client = stack.client()
            completion = await client.chat.completions.create(
                model="kimi-k2-0905-preview", messages=[{"role": "user", "content": "via proxy"}])
            stream = await client.chat.completions.create(
                model="kimi-k2-0905-preview", messages=[{"role": "user", "content": "via proxy"}], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert completion.choices[0].message.content and text
    assert seen == [f"{stack.emulator_url}/v1/chat/completions"] * 2


# --- thinking, per model family (app/kimi_models.py), against the emulator's rules ---------------------


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                   "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
    "strict": True}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


async def test_a_forced_tool_on_a_thinking_k2_model_is_sent_with_thinking_off(tmp_path: Path) -> None:
    """Kimi's thinking K2 models answer 400 to a forced tool choice while they think; kimi-pool turns thinking
    off for that turn on the models where it is on by default, so the client gets its tool call."""
    async with run_stack(tmp_path, keys=["sk-emu-0001"]) as stack:
        client = stack.client()
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            answer = await client.chat.completions.create(model="kimi-k2.6", messages=ASK, tools=WEATHER,
                                                          tool_choice=choice)  # type: ignore[arg-type]
            assert answer.choices[0].finish_reason == "tool_calls"
            assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"  # type: ignore[index]
            sent = stack.emulator.recent_requests("sk-emu-0001")[-1]
            assert sent["thinking"] == {"type": "disabled"} and "reasoning_effort" not in sent
            assert "$schema" not in sent["tools"][0]["function"]["parameters"], "Claude Code's marker is dropped"
            assert "strict" not in sent["tools"][0]["function"]
        # without a forced tool the model thinks, as it does by default: nothing is sent about thinking
        answer = await client.chat.completions.create(model="kimi-k2.6", messages=ASK, tools=WEATHER)
        assert "thinking" not in stack.emulator.recent_requests("sk-emu-0001")[-1]
        assert getattr(answer.choices[0].message, "reasoning_content", None)


async def test_each_family_gets_its_own_thinking_field_never_both(tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"]) as stack:
        client = stack.client()

        async def sent(model: str, **kw: object) -> dict[str, object]:
            await client.chat.completions.create(model=model, messages=ASK, **kw)  # type: ignore[call-overload]
            body = stack.emulator.recent_requests("sk-emu-0001")[-1]
            assert not ("thinking" in body and "reasoning_effort" in body)
            return {k: body[k] for k in ("thinking", "reasoning_effort") if k in body}

        assert await sent("kimi-k3", reasoning_effort="medium") == {"reasoning_effort": "high"}
        assert await sent("kimi-k3", reasoning_effort="xhigh") == {"reasoning_effort": "max"}
        assert await sent("kimi-k3", reasoning_effort="low", tools=WEATHER, tool_choice="required") \
            == {"reasoning_effort": "low"}, "K3 takes a forced tool while it thinks"
        assert await sent("kimi-k2.6", reasoning_effort="low") == {"thinking": {"type": "enabled"}}
        assert await sent("kimi-k2.6", reasoning_effort="none") == {"thinking": {"type": "disabled"}}
        off = {"thinking": {"type": "disabled"}}
        assert await sent("kimi-k2.6", extra_body=off) == off
        assert await sent("kimi-k2-0905-preview") == {}
        # what no account can serve is refused before any upstream is asked
        for model, kw, param in [
            ("kimi-k2.7-code", {"reasoning_effort": "none"}, "reasoning_effort"),
            ("kimi-k2.7-code", {"tools": WEATHER, "tool_choice": "required"}, "tool_choice"),
            ("kimi-k2.6", {"tools": WEATHER, "tool_choice": "required", "reasoning_effort": "high"}, "tool_choice"),
            ("kimi-k2-0905-preview", {"reasoning_effort": "high"}, "reasoning_effort"),
        ]:
            before = stack.emulator.snapshot()["totals"]["requests"]
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(model=model, messages=ASK, **kw)  # type: ignore[call-overload]
            assert refused.value.body["code"] == "unsupported_parameter"  # type: ignore[index]
            assert refused.value.body["param"] == param  # type: ignore[index]
            assert stack.emulator.snapshot()["totals"]["requests"] == before


async def test_reasoning_content_of_earlier_tool_turns_reaches_moonshot_untouched(tmp_path: Path) -> None:
    """Kimi's thinking models refuse a tool-call history without the reasoning that led to each call."""
    async with run_stack(tmp_path, keys=["sk-emu-0001"]) as stack:
        client = stack.client()
        first = await client.chat.completions.create(model="kimi-k2.6", messages=ASK, tools=WEATHER)
        call = first.choices[0].message
        reasoning = getattr(call, "reasoning_content", None)
        assert reasoning and call.tool_calls
        history = [*ASK, {"role": "assistant", "content": call.content, "reasoning_content": reasoning,
                          "tool_calls": [t.model_dump() for t in call.tool_calls]},
                   {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny, 21 C"}]
        second = await client.chat.completions.create(model="kimi-k2.6", messages=history, tools=WEATHER)
        assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content
        assert stack.emulator.recent_requests("sk-emu-0001")[-1]["messages"][1]["reasoning_content"] == reasoning
        # without it, Kimi's 400 is passed on (never retried elsewhere, never turned into text)
        history[1].pop("reasoning_content")
        with pytest.raises(openai.BadRequestError, match="reasoning_content"):
            await client.chat.completions.create(model="kimi-k2.6", messages=history, tools=WEATHER)


async def test_the_model_list_is_read_from_the_upstream_and_its_failures_are_classified() -> None:
    """``models`` against a peer answering ``GET /v1/models`` as told: a list, a dead key, a body that is no list."""
    answers = {
        "sk-good": (200, orjson.dumps({"object": "list", "data": [{"id": "kimi-k3"}, {"id": "kimi-k4"},
                                                                 {"id": "kimi-k3"}]})),
        "sk-dead": (401, body("invalid_authentication_error", "Invalid Authentication")),
        "sk-odd": (200, b'{"data": {"id": "kimi-k3"}}'),
        "sk-spaces": (200, orjson.dumps({"data": [{"id": "kimi k3"}]})),
    }

    async def models(request: Request) -> Response:
        status, raw = answers[request.headers["authorization"].removeprefix("Bearer ")]
        return Response(raw, status_code=status, media_type="application/json")

    async with serve(Starlette(routes=[Route("/v1/models", models)])) as url, aiohttp.ClientSession() as session:
        adapter = MoonshotUpstream(session, ManualClock())

        def account(key: str) -> Account:
            return Account(make_account_spec(name="a", kind="moonshot", secret=key, base_url=url + "/v1"), key)

        assert await adapter.models(account("sk-good")) == ("kimi-k3", "kimi-k4")
        with pytest.raises(AuthDead):
            await adapter.models(account("sk-dead"))
        for odd in ("sk-odd", "sk-spaces"):
            with pytest.raises(Transient, match="model list"):
                await adapter.models(account(odd))
