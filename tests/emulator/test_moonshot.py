"""The Moonshot emulator under real uvicorn, driven by the openai SDK and by raw HTTP.

Time only moves when a test advances the ``ManualClock``; nothing here sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from app.clock import ManualClock
from app.emulator.asgi import ConnectionCut
from app.emulator.moonshot import (
    ModelInfo,
    MoonshotEmulator,
    MoonshotEmulatorConfig,
    Org,
    OrgLimits,
    create_moonshot_emulator,
)
from app.emulator.moonshot_config import parse_model_spec
from tests.conftest import serve

KEY = "sk-emu-0001"
OTHER = "sk-emu-0002"
MODEL = "kimi-k2-turbo-preview"
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, Moonshot!"}]
HELLO_TOKENS = math.ceil(len("Be brief.Hello, Moonshot!") / 4)
REPLY = "Hello from the Moonshot emulator, a deterministic reply for testing the gateway."
REASONING = "Let me think about this request step by"  # the first 8 words


class Running:
    def __init__(self, url: str, emulator: MoonshotEmulator, clock: ManualClock,
                 http: httpx.AsyncClient) -> None:
        self.url = url
        self.emulator = emulator
        self.clock = clock
        self.http = http
        self.clients: list[openai.AsyncOpenAI] = []

    def sdk(self, key: str = KEY) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)
        self.clients.append(client)
        return client

    async def chat(self, key: str | None = KEY, **body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return await self.http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, **body},
                                    headers=headers)

    def stream(self, key: str = KEY, **body: Any) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        return self.http.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                json={"model": MODEL, "messages": HELLO, "stream": True, **body})


@contextlib.asynccontextmanager
async def running(config: MoonshotEmulatorConfig | None = None) -> AsyncIterator[Running]:
    clock = ManualClock()
    app = create_moonshot_emulator(config or MoonshotEmulatorConfig.simple(2), clock=clock)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        run = Running(url, app.state.emulator, clock, http)
        try:
            yield run
        finally:
            for client in run.clients:
                await client.close()


def events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [frame.removeprefix("data: ") for frame in text.split("\n\n") if frame.strip()]


def chunks(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(payload) for payload in events(text) if payload != "[DONE]"]


def error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return response.status_code, body["error"]["type"], body["error"]["message"]


# --- shapes --------------------------------------------------------------------------------------------


async def test_a_completion_has_the_platform_shape_and_an_objectid_style_id() -> None:
    async with running() as run:
        reply = await run.sdk().chat.completions.create(model=MODEL, messages=HELLO)
        assert reply.object == "chat.completion" and reply.model == MODEL
        assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", reply.id)
        assert int(reply.id[9:17], 16) == reply.created == int(run.clock.time())
        assert reply.system_fingerprint and re.fullmatch(r"fpv0_[0-9a-f]{8}", reply.system_fingerprint)
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == REPLY
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
            HELLO_TOKENS, 12, HELLO_TOKENS + 12)
        again = await run.sdk().chat.completions.create(model=MODEL, messages=HELLO)
        assert again.id != reply.id


async def test_a_stream_carries_usage_inside_the_final_choice_by_default() -> None:
    async with running() as run:
        response = await run.chat(stream=True)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = events(response.text)
        assert payloads[-1] == "[DONE]"
        parsed = chunks(response.text)
        assert {c["id"] for c in parsed} == {parsed[0]["id"]}
        assert int(parsed[0]["id"][9:17], 16) == parsed[0]["created"]
        assert all(c["object"] == "chat.completion.chunk" and c["system_fingerprint"].startswith("fpv0_")
                   for c in parsed)
        assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in parsed) == REPLY
        final = parsed[-1]
        assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "stop"
        assert final["choices"][0]["usage"] == {"prompt_tokens": HELLO_TOKENS, "completion_tokens": 12,
                                                "total_tokens": HELLO_TOKENS + 12}
        assert "usage" not in final
        assert all(c["choices"][0]["finish_reason"] is None for c in parsed[:-1])

        # The SDK reads the same stream to the end.
        stream = await run.sdk().chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == REPLY


@pytest.mark.parametrize(("position", "in_choice", "top"), [("top", False, True), ("both", True, True)])
async def test_usage_position_moves_usage_to_the_top_level(position: str, in_choice: bool, top: bool) -> None:
    async with running(MoonshotEmulatorConfig.simple(1, usage_position=position)) as run:
        final = chunks((await run.chat(stream=True)).text)[-1]
        assert ("usage" in final["choices"][0]) is in_choice
        assert final["usage"]["completion_tokens"] == 12 and final["choices"][0]["finish_reason"] == "stop"


async def test_include_usage_adds_a_top_level_usage_chunk_before_done() -> None:
    async with running() as run:
        response = await run.chat(stream=True, stream_options={"include_usage": True})
        payloads = events(response.text)
        last = orjson.loads(payloads[-2])
        assert payloads[-1] == "[DONE]"
        assert last["choices"] == [] and last["usage"]["total_tokens"] == HELLO_TOKENS + 12
        stream = await run.sdk().chat.completions.create(
            model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True})
        usages = [c.usage for c in [c async for c in stream] if c.usage is not None]
        assert usages and usages[-1].completion_tokens == 12


async def test_a_thinking_model_streams_reasoning_before_the_answer() -> None:
    async with running() as run:
        parsed = chunks((await run.chat(model="kimi-k2-thinking", stream=True)).text)
        deltas = [c["choices"][0]["delta"] for c in parsed[1:-1]]
        kinds = ["reasoning" if "reasoning_content" in d else "content" for d in deltas]
        assert kinds == ["reasoning"] * 8 + ["content"] * 12
        assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
        assert parsed[-1]["choices"][0]["usage"]["completion_tokens"] == 20

        whole = (await run.chat(model="kimi-k2-thinking")).json()
        assert whole["choices"][0]["message"]["reasoning_content"] == REASONING
        assert whole["choices"][0]["message"]["content"] == REPLY


async def test_max_tokens_shorter_than_the_reply_finishes_with_length() -> None:
    async with running() as run:
        parsed = chunks((await run.chat(stream=True, max_tokens=3)).text)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in parsed) == "Hello from the"
        assert parsed[-1]["choices"][0]["finish_reason"] == "length"
        assert parsed[-1]["choices"][0]["usage"]["completion_tokens"] == 3
        whole = (await run.chat(max_completion_tokens=2)).json()
        assert whole["choices"][0]["message"]["content"] == "Hello from"
        assert whole["choices"][0]["finish_reason"] == "length"


async def test_text_parts_count_towards_the_prompt_estimate() -> None:
    async with running() as run:
        messages = [{"role": "user", "content": [{"type": "text", "text": "x" * 10},
                                                  {"type": "image_url", "image_url": {"url": "data:,"}}]}]
        assert (await run.chat(model="kimi-k2.5", messages=messages)).json()["usage"]["prompt_tokens"] == 3


# --- errors, in the documented check order -------------------------------------------------------------


async def test_each_check_answers_in_the_documented_order() -> None:
    """Peel a request that fails every check, one check at a time (PROTOCOLS.md 4.8)."""
    config = MoonshotEmulatorConfig(
        orgs={"org-a": Org("org-a", OrgLimits(concurrency=1, rpm=5, tpm=10_000, tpd=20_000))},
        keys={KEY: "org-a"}, models={"moonshot-v1-8k": ModelInfo(8_192)})
    async with running(config) as run:
        run.emulator.script(KEY, [{"kind": "hold_after", "chunks": 0}])
        async with run.stream(model="moonshot-v1-8k", max_tokens=100):
            await run.emulator.wait_for(lambda e: e.held == 1)
            run.emulator.configure({"overloaded": True, "orgs": {"org-a": {
                "balance": 0, "limits": {"rpm": 1, "tpm": 1, "tpd": 1}}}})
            huge = [{"role": "user", "content": "x" * 40_000}]
            steps: list[tuple[dict[str, Any], tuple[int, str, str]]] = [
                ({}, (401, "invalid_authentication_error", "Invalid Authentication")),
                ({"key": KEY}, (404, "resource_not_found_error",
                                "Not found the model kimi-k2-turbo-preview or Permission denied")),
                ({"model": "moonshot-v1-8k"}, (429, "exceeded_current_quota_error", "insufficient balance")),
                ({"orgs": {"balance": 10}}, (429, "rate_limit_reached_error", "concurrency")),
                ({"limits": {"concurrency": None}}, (429, "rate_limit_reached_error", "RPM")),
                ({"limits": {"rpm": None}}, (429, "rate_limit_reached_error", "TPM")),
                ({"limits": {"tpm": None}}, (429, "rate_limit_reached_error", "TPD")),
                ({"limits": {"tpd": None}}, (429, "engine_overloaded_error", "overloaded")),
                ({"overloaded": False}, (400, "invalid_request_error", "exceeded model token limit : 8192")),
            ]
            request: dict[str, Any] = {"key": "sk-wrong", "model": MODEL, "messages": huge}
            for fix, (status, type_, text) in steps:
                if "orgs" in fix:
                    run.emulator.configure({"orgs": {"org-a": fix["orgs"]}})
                elif "limits" in fix:
                    run.emulator.configure({"orgs": {"org-a": {"limits": fix["limits"]}}})
                elif "overloaded" in fix:
                    run.emulator.configure(fix)
                else:
                    request.update(fix)
                got = error(await run.chat(**request))
                assert got[:2] == (status, type_) and text in got[2], (fix, got)
            request["messages"] = HELLO
            assert (await run.chat(**request)).status_code == 200
            run.emulator.release()
        totals = run.emulator.stats.totals
        assert totals.by_status == {"200": 2, "401": 1, "404": 1, "429": 6, "400": 1}
        assert totals.rejected == {"quota": 1, "concurrency": 1, "rpm": 1, "tpm": 1, "tpd": 1,
                                   "overloaded": 1}


@pytest.mark.parametrize(("body", "problem"), [
    (b"{not json", "the body is not valid JSON"),
    (b'{"model": "kimi-k2-turbo-preview"}', "messages must be a non-empty array"),
    (b'{"model": "kimi-k2-turbo-preview", "messages": []}', "messages must be a non-empty array"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "model is required"),
    (b'{"model": "kimi-k2-turbo-preview", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
     "max_tokens must be a positive integer"),
])
async def test_a_malformed_body_is_an_invalid_request(body: bytes, problem: str) -> None:
    async with running() as run:
        response = await run.http.post("/v1/chat/completions", content=body,
                                       headers={"Authorization": f"Bearer {KEY}"})
        assert error(response) == (400, "invalid_request_error", f"Invalid request: {problem}")


async def test_missing_or_foreign_keys_are_refused_with_the_sdk_error() -> None:
    async with running() as run:
        assert error(await run.chat(key=None)) == (
            401, "invalid_authentication_error", "Invalid Authentication")
        with pytest.raises(openai.AuthenticationError) as caught:
            await run.sdk("sk-from-the-other-platform").chat.completions.create(
                model=MODEL, messages=HELLO)
        assert caught.value.response.json() == {
            "error": {"type": "invalid_authentication_error", "message": "Invalid Authentication"}}
        assert run.emulator.stats.totals.by_status == {"401": 2}


async def test_a_suspended_organization_is_out_of_quota() -> None:
    async with running() as run:
        run.emulator.configure({"orgs": {"org-0001": {"suspended": True}}})
        with pytest.raises(openai.RateLimitError) as caught:
            await run.sdk().chat.completions.create(model=MODEL, messages=HELLO)
        assert caught.value.response.json()["error"] == {
            "type": "exceeded_current_quota_error",
            "message": "You exceeded your current quota, please check your plan and billing details"}
        assert (await run.chat(key=OTHER)).status_code == 200


# --- rate limits ---------------------------------------------------------------------------------------


async def test_the_rpm_window_slides_with_the_clock() -> None:
    async with running(MoonshotEmulatorConfig.simple(2, rpm=2)) as run:
        assert (await run.chat()).status_code == 200
        run.clock.advance(20)
        assert (await run.chat()).status_code == 200
        status, type_, message = error(await run.chat())
        assert (status, type_) == (429, "rate_limit_reached_error")
        assert re.fullmatch(r"Your account org-0001<ak-[0-9a-f]+> request reached organization max RPM: 2, "
                            r"please try again after 40 seconds", message)
        assert (await run.chat(key=OTHER)).status_code == 200, "another organization has its own window"
        run.clock.advance(39)
        assert "after 1 seconds" in error(await run.chat())[2]
        run.clock.advance(1)  # the first request leaves the window, the second stays
        assert (await run.chat()).status_code == 200
        assert (await run.chat()).status_code == 429
        assert run.emulator.stats.orgs["org-0001"].rejected == {"rpm": 3}


async def test_keys_of_one_organization_share_its_concurrency() -> None:
    config = MoonshotEmulatorConfig(orgs={"org-a": Org("org-a", OrgLimits(concurrency=1))},
                                    keys={KEY: "org-a", OTHER: "org-a"})
    async with running(config) as run:
        run.emulator.script(KEY, [{"kind": "hold_after", "chunks": 1}])
        stream = await run.sdk().chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        first = await anext(aiter(stream))
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as caught:
            await run.sdk(OTHER).chat.completions.create(model=MODEL, messages=HELLO)
        message = caught.value.response.json()["error"]["message"]
        assert re.fullmatch(r"Your account org-a<ak-[0-9a-f]+> request reached max organization "
                            r"concurrency: 1, please try again after 1 seconds", message)
        assert run.emulator.release() == 1
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == REPLY
        snapshot = run.emulator.snapshot()
        org = snapshot["orgs"]["org-a"]
        assert (org["peak_in_flight"], org["in_flight"]) == (1, 0)
        assert snapshot["keys"][OTHER]["rejected"] == {"concurrency": 1}
        assert snapshot["keys"][KEY]["completed_streams"] == 1


async def test_tpm_is_charged_up_front_with_max_tokens() -> None:
    async with running(MoonshotEmulatorConfig.simple(1, tpm=1_000)) as run:
        cost = HELLO_TOKENS + 600
        assert (await run.chat(max_tokens=600)).status_code == 200
        run.clock.advance(15)
        status, type_, message = error(await run.chat(max_tokens=600))
        assert (status, type_) == (429, "rate_limit_reached_error")
        assert message.endswith(f"request reached organization TPM rate limit, current: {2 * cost}, "
                                "limit: 1000, please try again after 45 seconds")
        assert (await run.chat(max_tokens=100)).status_code == 200, "a smaller budget still fits"
        assert run.emulator.stats.totals.tokens_charged == cost + HELLO_TOKENS + 100
        assert run.emulator.stats.totals.tokens_used == 2 * (HELLO_TOKENS + 12)


async def test_tpd_resets_at_midnight_utc_or_rolls_over_24_hours() -> None:
    async with running(MoonshotEmulatorConfig.simple(1, tpd=2_000, default_max_tokens=1_000)) as run:
        assert (await run.chat()).status_code == 200
        to_midnight = 86_400 - int(run.clock.time()) % 86_400
        message = error(await run.chat())[2]
        assert "TPD rate limit" in message and f"please try again after {to_midnight} seconds" in message
        run.clock.advance(to_midnight)
        assert (await run.chat()).status_code == 200

    config = MoonshotEmulatorConfig.simple(1, tpd=2_000, default_max_tokens=1_000, tpd_window="rolling")
    async with running(config) as run:
        assert (await run.chat()).status_code == 200
        run.clock.advance(3_600)
        assert "please try again after 82800 seconds" in error(await run.chat())[2]
        run.clock.advance(82_800)
        assert (await run.chat()).status_code == 200


async def test_rate_limit_headers_are_a_knob() -> None:
    async with running(MoonshotEmulatorConfig.simple(1, rpm=2)) as run:
        await run.chat()
        await run.chat()
        refused = await run.chat()
        assert refused.status_code == 429 and "retry-after" not in refused.headers
        run.emulator.configure({"rate_limit_headers": True})
        run.clock.advance(30)
        refused = await run.chat()
        assert refused.headers["retry-after"] == "30" and refused.headers["x-ratelimit-limit"] == "2"
        assert refused.headers["x-ratelimit-remaining"] == "0"
        run.clock.advance(30)
        ok = await run.chat()
        assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining"] == "1"
        assert ok.headers["x-ratelimit-reset"] == "60"


# --- scripted outcomes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("outcome", "status", "type_", "sdk_error"), [
    ({"kind": "rate_limit", "bucket": "concurrency", "wait": 3}, 429, "rate_limit_reached_error",
     openai.RateLimitError),
    ({"kind": "auth"}, 401, "invalid_authentication_error", openai.AuthenticationError),
    ({"kind": "quota"}, 429, "exceeded_current_quota_error", openai.RateLimitError),
    ({"kind": "overloaded"}, 429, "engine_overloaded_error", openai.RateLimitError),
    ({"kind": "server_error"}, 500, "server_error", openai.InternalServerError),
    ({"kind": "status", "status": 503, "type": "server_unavailable", "message": "scaling up"}, 503,
     "server_unavailable", openai.InternalServerError),
])
async def test_scripted_errors_reach_the_sdk(outcome: dict[str, Any], status: int, type_: str,
                                             sdk_error: type[openai.APIStatusError]) -> None:
    async with running() as run:
        run.emulator.script(KEY, [outcome])
        with pytest.raises(sdk_error) as caught:
            await run.sdk().chat.completions.create(model=MODEL, messages=HELLO)
        assert caught.value.status_code == status
        assert caught.value.response.json()["error"]["type"] == type_
        assert (await run.chat()).status_code == 200, "a script is consumed once"
        assert run.emulator.stats.keys[KEY].by_status == {str(status): 1, "200": 1}


async def test_a_scripted_rate_limit_names_its_bucket_and_wait() -> None:
    async with running() as run:
        run.emulator.script(None, [{"kind": "rate_limit", "bucket": "rpm", "wait": 7.2}])
        message = error(await run.chat())[2]
        assert message.endswith("request reached organization max RPM: 3, please try again after 8 seconds")
        assert run.emulator.stats.totals.rejected == {"rpm": 1}


async def test_scripts_are_fifo_per_key_before_the_shared_queue() -> None:
    async with running() as run:
        run.emulator.script(KEY, [{"kind": "overloaded"}, {"kind": "ok"}, {"kind": "server_error"}])
        run.emulator.script(None, [{"kind": "auth"}])
        assert (await run.chat(key=OTHER)).status_code == 401
        assert [(await run.chat()).status_code for _ in range(4)] == [429, 200, 500, 200]
        with pytest.raises(ValueError, match="unknown outcome kind"):
            run.emulator.script(KEY, [{"kind": "ok"}, {"kind": "explode"}])
        assert run.emulator.snapshot()["scripts"] == {}, "a bad script queues nothing"


async def test_html_504_is_a_gateway_page_not_json() -> None:
    async with running() as run:
        run.emulator.script(KEY, [{"kind": "html_504"}])
        response = await run.chat()
        assert response.status_code == 504 and response.headers["content-type"].startswith("text/html")
        assert "<h1>504 Gateway Time-out</h1>" in response.text
        run.emulator.script(KEY, [{"kind": "html_504"}])
        with pytest.raises(openai.InternalServerError):
            await run.sdk().chat.completions.create(model=MODEL, messages=HELLO)


async def test_drop_after_cuts_the_connection_mid_stream() -> None:
    async with running() as run:
        run.emulator.script(KEY, [{"kind": "drop_after", "chunks": 3}])
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            async with run.stream() as response:
                assert response.status_code == 200
                async for data in response.aiter_bytes():
                    received += data
        parsed = chunks(received.decode())
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in parsed) == "Hello from the"
        assert b"[DONE]" not in received and b"finish_reason\":\"stop" not in received
        await run.emulator.wait_for(lambda e: e.stats.totals.dropped == 1)
        totals = run.emulator.stats.totals
        assert (totals.dropped, totals.completed, totals.in_flight) == (1, 0, 0)
        assert (await run.chat(stream=True)).text.endswith("data: [DONE]\n\n"), "the next stream is whole"


async def test_drop_after_truncates_a_json_body() -> None:
    async with running() as run:
        run.emulator.script(KEY, [{"kind": "drop_after"}])
        with pytest.raises(openai.APIConnectionError):
            await run.sdk().chat.completions.create(model=MODEL, messages=HELLO)
        await run.emulator.wait_for(lambda e: e.stats.totals.dropped == 1 and e.stats.totals.in_flight == 0)


async def test_error_chunk_after_ends_the_stream_with_an_error_event() -> None:
    async with running() as run:
        run.emulator.script(KEY, [{"kind": "error_chunk_after", "chunks": 2,
                                   "type": "engine_overloaded_error", "message": "gone"}])
        payloads = events((await run.chat(stream=True)).text)
        assert orjson.loads(payloads[-1]) == {"error": {"type": "engine_overloaded_error", "message": "gone"}}
        assert len(payloads) == 4 and "[DONE]" not in payloads


async def test_a_delayed_first_token_waits_for_the_clock() -> None:
    async with running() as run:
        run.emulator.script(KEY, [{"kind": "delay_first_token", "seconds": 30}])
        reply = asyncio.create_task(run.chat())
        await run.clock.wait_for_sleepers(1)
        assert run.emulator.stats.totals.in_flight == 1 and not reply.done()
        run.clock.advance(30)
        assert (await reply).json()["choices"][0]["message"]["content"] == REPLY


async def test_stream_cadence_follows_first_token_delay_and_chunk_interval() -> None:
    config = MoonshotEmulatorConfig.simple(1, first_token_delay=2.0, chunk_interval=0.5)
    async with running(config) as run, run.stream() as response:
        lines = response.aiter_lines()
        await run.clock.wait_for_sleepers(1)  # headers first, then the first token after the delay
        run.clock.advance(2.0)
        assert orjson.loads((await anext(lines)).removeprefix("data: "))["choices"][0]["delta"]["role"]
        assert (await anext(lines)) == ""
        assert '"Hello"' in await anext(lines)
        await anext(lines)
        for word in REPLY.split()[1:]:
            run.clock.advance(0.5)
            assert f'"content":" {word}"' in await anext(lines)
            await anext(lines)
        assert "finish_reason\":\"stop" in await anext(lines)


# --- client disconnects, in-flight accounting ------------------------------------------------------------


async def test_a_client_leaving_mid_stream_is_recorded_and_frees_its_slot() -> None:
    async with running(MoonshotEmulatorConfig.simple(1, concurrency=1)) as run:
        run.emulator.script(KEY, [{"kind": "hold_after", "chunks": 2}])
        async with run.stream() as response:
            lines = response.aiter_lines()
            while '" from"' not in await anext(lines):
                pass
            assert run.emulator.stats.totals.in_flight == 1
        await run.emulator.wait_for(lambda e: e.stats.totals.client_disconnects == 1)
        totals = run.emulator.stats.totals
        assert (totals.in_flight, totals.completed, run.emulator.held) == (0, 0, 0)
        assert totals.tokens_used == HELLO_TOKENS + 2, "what was generated is billed"
        assert (await run.chat()).status_code == 200, "the concurrency slot is free again"


async def test_a_client_leaving_while_the_stream_sleeps_is_noticed() -> None:
    async with running(MoonshotEmulatorConfig.simple(1, chunk_interval=5.0)) as run:
        async with run.stream() as response:
            lines = response.aiter_lines()
            assert '"Hello"' in await anext(lines) + await anext(lines) + await anext(lines)
        await run.emulator.wait_for(
            lambda e: e.stats.totals.client_disconnects == 1 and e.stats.totals.in_flight == 0)
        assert run.clock.sleepers == 0, "the emulator stopped generating"


# --- utility routes --------------------------------------------------------------------------------------


async def test_models_are_listed_with_their_context_length() -> None:
    config = MoonshotEmulatorConfig.simple(1, models={"kimi-k3": ModelInfo(524_288, "default_on")})
    async with running(config) as run:
        models = [m async for m in run.sdk().models.list()]
        assert [(m.id, m.object, m.owned_by) for m in models] == [("kimi-k3", "model", "moonshot")]
        raw = (await run.http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).json()
        assert raw["object"] == "list" and raw["data"][0]["context_length"] == 524_288
        assert (await run.http.get("/v1/models")).status_code == 401
    specs = ["kimi-k4:1048576:default_on:vision:forced-tools", "moonshot-v1-8k"]  # as `emulate --model` takes them
    async with running(MoonshotEmulatorConfig.simple(1, models=dict(map(parse_model_spec, specs)))) as run:
        raw = (await run.http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).json()["data"]
        assert [(m["id"], m["context_length"], m["thinking"], m["supports_image_in"],
                 m["forced_tool_choice_with_thinking"]) for m in raw] == [
            ("kimi-k4", 1_048_576, "default_on", True, True), ("moonshot-v1-8k", 8_192, "none", False, False)]
    async with running() as run:
        ids = [m.id async for m in run.sdk().models.list()]
        assert ids == ["kimi-k2.5", "kimi-k2.6", "kimi-k2.7-code", "kimi-k3", "kimi-k2-0905-preview",
                       "kimi-k2-turbo-preview", "kimi-k2-thinking", "kimi-k2-thinking-turbo", "moonshot-v1-8k",
                       "moonshot-v1-32k", "moonshot-v1-128k"]


async def test_the_served_models_change_at_runtime_as_moonshot_retires_and_adds_ids() -> None:
    async with running() as run:
        applied = await run.http.post("/__fake/config", json={"models": ["kimi-k3", "kimi-k4:1048576:default_on"]})
        assert applied.status_code == 200 and applied.json()["models"] == ["kimi-k3", "kimi-k4"]
        assert [m.id async for m in run.sdk().models.list()] == ["kimi-k3", "kimi-k4"]
        assert (await run.chat(model="kimi-k4")).status_code == 200
        assert error(await run.chat(model="kimi-k2.5"))[:2] == (404, "resource_not_found_error")
        for bad in ({"models": []}, {"models": ["kimi-k9"]}, {"models": "kimi-k3"}, {"models": ["k:1:sometimes"]}):
            refused = await run.http.post("/__fake/config", json=bad)
            assert refused.status_code == 400, bad
        assert [m.id async for m in run.sdk().models.list()] == ["kimi-k3", "kimi-k4"], "refused: nothing changed"


async def test_the_balance_is_debited_by_the_tokens_used() -> None:
    async with running(MoonshotEmulatorConfig.simple(1, balance=5.0, price_per_1k_tokens=2.0)) as run:
        await run.chat()
        response = await run.http.get("/v1/users/me/balance", headers={"Authorization": f"Bearer {KEY}"})
        spent = (HELLO_TOKENS + 12) * 2.0 / 1000
        assert response.json() == {"code": 0, "data": {"available_balance": pytest.approx(5.0 - spent),
                                                       "voucher_balance": 0.0,
                                                       "cash_balance": pytest.approx(5.0 - spent)},
                                   "scode": "0x0", "status": True}
        assert (await run.http.get("/v1/users/me/balance")).status_code == 401
        run.emulator.configure({"orgs": {"org-0001": {"balance": 0.001}}})
        assert (await run.chat()).status_code == 200, "a positive balance may run into arrears"
        assert "insufficient balance" in error(await run.chat())[2]


async def test_the_tokenizer_agrees_with_the_charged_prompt() -> None:
    async with running() as run:
        headers = {"Authorization": f"Bearer {KEY}"}
        estimate = await run.http.post("/v1/tokenizers/estimate-token-count", headers=headers,
                                       json={"model": MODEL, "messages": HELLO})
        assert estimate.json() == {"code": 0, "data": {"total_tokens": HELLO_TOKENS}, "scode": "0x0",
                                   "status": True}
        assert (await run.chat()).json()["usage"]["prompt_tokens"] == HELLO_TOKENS
        unknown = await run.http.post("/v1/tokenizers/estimate-token-count", headers=headers,
                                      json={"model": "gpt-4", "messages": HELLO})
        assert error(unknown)[:2] == (404, "resource_not_found_error")
        assert (await run.http.post("/v1/tokenizers/estimate-token-count", json={})).status_code == 401


async def test_unknown_routes_answer_in_the_error_format() -> None:
    async with running() as run:
        assert error(await run.http.get("/v1/files"))[:2] == (404, "resource_not_found_error")
        assert error(await run.http.get("/v1/chat/completions"))[0] == 405


# --- control routes --------------------------------------------------------------------------------------


async def test_the_control_routes_script_release_report_and_reset() -> None:
    async with running(MoonshotEmulatorConfig.simple(1, rpm=1)) as run:
        scripted = await run.http.post("/__fake/script", json={"key": None, "outcomes": [
            {"kind": "hold_after", "chunks": 0}]})
        assert scripted.json() == {"queued": 1}
        bad = await run.http.post("/__fake/script", json={"key": KEY, "outcomes": [{"kind": "hold_after",
                                                                                    "chunks": -1}]})
        assert error(bad)[0] == 400 and "chunks must be >= 0" in error(bad)[2]

        held = asyncio.create_task(run.chat(stream=True))
        await run.emulator.wait_for(lambda e: e.held == 1)
        state = (await run.http.get("/__fake/state")).json()
        assert state["totals"]["in_flight"] == 1 and state["held"] == 1
        assert state["orgs"]["org-0001"]["window"]["rpm"] == 1
        assert (await run.http.post("/__fake/release")).json() == {"released": 1}
        assert (await held).text.endswith("data: [DONE]\n\n")
        assert (await run.chat()).status_code == 429

        run.emulator.script(KEY, [{"kind": "auth"}])
        assert (await run.http.post("/__fake/reset")).status_code == 200
        state = (await run.http.get("/__fake/state")).json()
        assert state == run.emulator.snapshot()
        assert state["totals"]["requests"] == 0 and state["scripts"] == {}
        assert state["orgs"]["org-0001"]["balance"] == 100.0
        assert (await run.chat()).status_code == 200, "the RPM window was emptied"


async def test_the_config_route_changes_knobs_at_runtime() -> None:
    async with running() as run:
        applied = await run.http.post("/__fake/config", json={"reply_words": 3, "overloaded": True})
        assert applied.json()["reply_words"] == 3
        assert error(await run.chat()) == (429, "engine_overloaded_error",
                                           "The engine is currently overloaded, please try again later")
        await run.http.post("/__fake/config", json={"overloaded": False})
        assert (await run.chat()).json()["choices"][0]["message"]["content"] == "Hello from the"
        bad_changes = ({"orgs": {"org-9": {"balance": 1}}}, {"reply_words": -1}, {"keys": {}},
                       {"chunk_interval": "x"}, {"usage_position": "bottom"})
        for bad in bad_changes:
            assert (await run.http.post("/__fake/config", json=bad)).status_code == 400, bad


async def test_wait_for_times_out_when_nothing_happens() -> None:
    async with running() as run:
        with pytest.raises(TimeoutError):
            await run.emulator.wait_for(lambda e: e.stats.totals.requests > 0, timeout=0.05)


def test_a_key_must_belong_to_a_known_organization() -> None:
    with pytest.raises(ValueError, match="unknown organization"):
        MoonshotEmulatorConfig(orgs={}, keys={KEY: "org-x"})
    simple = MoonshotEmulatorConfig.simple(3, rpm=3)
    assert list(simple.keys) == ["sk-emu-0001", "sk-emu-0002", "sk-emu-0003"]
    assert {org.name: org.limits.rpm for org in simple.orgs.values()} == {
        "org-0001": 3, "org-0002": 3, "org-0003": 3}


async def test_a_drop_under_a_server_without_a_transport_still_fails_the_response() -> None:
    """Elsewhere than under uvicorn, the cut is an application error: servers then close the connection."""
    app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(1), clock=ManualClock())
    app.state.emulator.script(KEY, [{"kind": "drop_after", "chunks": 1}])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as http:
        with pytest.raises(ConnectionCut):
            await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": MODEL, "messages": HELLO, "stream": True})
    assert app.state.emulator.stats.totals.dropped == 1
