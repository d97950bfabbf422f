"""``POST /v1/chat/completions`` through the real gateway and emulator, driven by the openai SDK."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import openai
import orjson
import pytest
from sqlalchemy import text

from app.cli import run
from app.emulator.moonshot import MoonshotEmulatorConfig
from app.store.db import Database
from tests.conftest import MASTER_KEY, reload, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "Say hello to the pool."}]


async def test_non_streaming_answer_is_one_openai_completion(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        raw = await stack.client().chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
        completion = raw.parse()
        assert raw.headers["x-request-id"]
        assert raw.headers["content-type"].startswith("application/json")
        assert completion.object == "chat.completion"
        assert completion.model == MODEL
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.total_tokens > 0
        message = orjson.loads(raw.content)["choices"][0]["message"]
        assert "refusal" in message and message["refusal"] is None, "the spec requires the key"


async def test_stream_follows_the_openai_chunk_contract(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        stream = await stack.client().chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert all(c.usage is None for c in chunks), "no usage chunk unless the client asks"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) >= 3


async def test_include_usage_adds_a_last_chunk_with_empty_choices(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        stream = await stack.client().chat.completions.create(
            model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens > 0
        assert all(c.usage is None for c in chunks[:-1])


async def test_raw_stream_is_sse_and_ends_with_done(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        body = {"model": MODEL, "messages": HELLO, "stream": True}
        response = await http.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {MASTER_KEY}"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in response.text.split("\n\n") if f]
        assert frames[-1] == "data: [DONE]"
        assert all(f.startswith("data: ") for f in frames)


async def test_what_real_clients_send_is_accepted(tmp_path: Path) -> None:
    """Part arrays with unknown keys, n as 1.0, max_completion_tokens, user, X-Api-Key, tools."""
    async with run_stack(tmp_path) as stack, stack.http() as http:
        body = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief.",
                                                "cache_control": {"type": "ephemeral"}}]},
                {"role": "user", "content": "hi"},
            ],
            "n": 1.0, "max_completion_tokens": 64, "user": "u-1", "temperature": 0.3,
            "stream_options": None, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        }
        response = await http.post("/v1/chat/completions", json=body, headers={"X-Api-Key": MASTER_KEY})
        assert response.status_code == 200, response.text
        seen = stack.emulator.snapshot()
        assert seen["totals"]["requests"] == 1


async def test_usage_of_every_request_is_stored(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        client = stack.client()
        await client.chat.completions.create(model=MODEL, messages=HELLO)
        stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        async for _ in stream:
            pass
        await stack.app.state.writer.flush()
        db = Database(stack.db_url)
        async with db.session() as session:
            rows = (await session.execute(text(
                "select account, client_key, model, stream, prompt_tokens, completion_tokens, status, outcome "
                "from usage order by id"))).all()
        await db.dispose()
        assert [(r.client_key, r.model, bool(r.stream), r.status, r.outcome) for r in rows] == [
            ("master", MODEL, False, 200, "ok"), ("master", MODEL, True, 200, "ok")]
        assert all(r.account and r.account.startswith("acct-") and r.completion_tokens > 0 for r in rows)


async def test_client_disconnect_mid_stream_cancels_upstream_and_frees_the_account(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        stack.emulator.script(None, [{"kind": "hold_after", "chunks": 2}])
        released = asyncio.Event()
        stack.gateway.pool.on_release(released.set)
        body = {"model": MODEL, "messages": HELLO, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {MASTER_KEY}"}) as response:
            lines = response.aiter_lines()
            while "content" not in await anext(lines):
                pass
        # the client is gone while the upstream is quiet: the gateway must notice by itself
        await asyncio.wait_for(released.wait(), 5)
        assert sum(a.in_flight for a in stack.gateway.pool.accounts.values()) == 0
        await stack.emulator.wait_for(lambda emu: emu.snapshot()["totals"]["client_disconnects"] == 1)
        stack.emulator.release()


async def test_failure_after_streaming_began_ends_with_an_error_event(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        stack.emulator.script(None, [{"kind": "drop_after", "chunks": 2}])
        body = {"model": MODEL, "messages": HELLO, "stream": True}
        response = await http.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {MASTER_KEY}"})
        frames = [f for f in response.text.split("\n\n") if f]
        assert response.status_code == 200
        last = orjson.loads(frames[-1].removeprefix("data: "))
        assert "error" in last and last["error"]["type"] == "upstream_error"
        assert "data: [DONE]" not in frames
        assert not any("finish_reason\":\"stop" in f for f in frames), "a cut stream never looks finished"


async def test_an_error_event_inside_the_upstream_stream_is_reported_as_what_it_was(tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"]) as stack, stack.http() as http:
        stack.emulator.script(None, [{"kind": "error_chunk_after", "chunks": 2, "type": "engine_overloaded_error",
                                      "message": "The engine is currently overloaded"}])
        response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "stream": True},
                                   headers={"Authorization": f"Bearer {MASTER_KEY}"})
        error = response.json()["error"]  # the only account failed before a byte reached the client
        assert response.status_code == 503
        assert "overloaded" in error["message"] and "HTTP 500" not in error["message"]


async def test_request_ids_are_returned_and_client_ids_echoed(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        mine = await http.get("/healthz", headers={"x-request-id": "trace-42"})
        theirs = await http.get("/healthz")
        assert mine.headers["x-request-id"] == "trace-42"
        assert theirs.headers["x-request-id"].startswith("req_")


async def test_cors_preflight_reflects_requested_headers(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        response = await http.options("/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert response.status_code == 200
        assert "x-stainless-os" in response.headers["access-control-allow-headers"].lower()
        simple = await http.get("/v1/models", headers={"Origin": "http://localhost:3000",
                                                       "Authorization": f"Bearer {MASTER_KEY}"})
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
        chat = await http.post("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                                "Authorization": f"Bearer {MASTER_KEY}"},
                               json={"model": MODEL, "messages": HELLO})
        assert chat.headers["access-control-allow-origin"] == "*"
        assert "x-request-id" in chat.headers["access-control-expose-headers"].lower()


async def test_client_keys_from_the_cli_authenticate_a_running_server(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path) as stack:
        assert await asyncio.to_thread(run, ["--db", stack.db_url, "keys", "create", "batch-team"]) == 0
        match = re.search(r"kp-[A-Za-z0-9_-]{20,}", capsys.readouterr().out)
        assert match is not None
        await reload(stack)
        completion = await stack.client(match.group(0)).chat.completions.create(model=MODEL, messages=HELLO)
        assert completion.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            await stack.client("kp-not-a-key").models.list()
        await stack.app.state.writer.flush()
        async with Database(stack.db_url).session() as session:
            keys = (await session.execute(text("select client_key from usage"))).scalars().all()
        assert keys == ["batch-team"]


@pytest.mark.parametrize("position", ["top", "both"])
async def test_usage_is_read_wherever_moonshot_puts_it(tmp_path: Path, position: str) -> None:
    config = MoonshotEmulatorConfig.simple(keys=1, usage_position=position)
    async with run_stack(tmp_path, emulator=config) as stack:
        stream = await stack.client().chat.completions.create(
            model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        usage_chunks = [c for c in chunks if c.usage is not None]
        assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
        assert usage_chunks[0].usage.completion_tokens == 12  # the emulator's reply is 12 tokens
