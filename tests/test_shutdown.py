"""SIGTERM on a real ``kimi-pool serve`` process: in-flight streams finish, usage is stored, exit 0; what
still runs when the grace period ends gets its protocol's error (a JSON 503 or 529, or a last error event) and is
recorded as ``shutting_down``."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import MASTER_KEY, accounts_toml, gateway_process, read_until, serve

MODEL = "kimi-k2-0905-preview"
MESSAGES: Any = [{"role": "user", "content": "hello"}]


async def test_sigterm_lets_a_stream_finish_stores_its_usage_and_exits_0(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    emulator = emulator_app.state.emulator
    async with serve(emulator_app) as emulator_url, gateway_process(tmp_path, emulator_url) as (process, url, log):
        assert process.stderr is not None
        emulator.script("sk-emu-0001", [{"kind": "hold_after", "chunks": 3}])
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0)
        stream = await client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                                      messages=[{"role": "user", "content": "hello"}])
        chunks = [await anext(stream)]
        await emulator.wait_for(lambda e: e.held == 1)

        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(read_until(process.stderr, "Shutting down", log), 30)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            async with httpx.AsyncClient() as http:
                await http.get(url + "/healthz")

        emulator.release()
        chunks += [chunk async for chunk in stream]
        assert chunks[-2].choices[0].finish_reason == "stop" or chunks[-1].choices == []
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens > 0
        await client.close()

        rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode(errors="replace")
        assert await process.wait() == 0, "".join(log) + rest
        assert "Traceback" not in rest

    with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
        rows = db.execute("SELECT status, outcome, stream, completion_tokens FROM usage").fetchall()
    assert rows == [(200, "ok", 1, usage.completion_tokens)], "the stream's usage was flushed before exit"


async def test_requests_running_at_the_end_of_the_grace_period_get_an_openai_error_and_are_recorded(
        tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    emulator = emulator_app.state.emulator
    async with serve(emulator_app) as emulator_url:
        accounts = accounts_toml(emulator_url, ["sk-emu-0001"], concurrency=2)
        async with gateway_process(tmp_path, emulator_url, "--shutdown-grace", "1", accounts=accounts) as (
                process, url, log):
            assert process.stderr is not None
            emulator.script("sk-emu-0001", [{"kind": "hold_after", "chunks": 2}, {"kind": "hold_after", "chunks": 0}])
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0)
            stream = await client.chat.completions.create(model=MODEL, stream=True, messages=MESSAGES)
            await anext(stream)
            whole = asyncio.ensure_future(client.chat.completions.create(model=MODEL, messages=MESSAGES))
            await emulator.wait_for(lambda e: e.held == 2)  # both hold the account's two slots
            queued = asyncio.ensure_future(client.chat.completions.create(model=MODEL, messages=MESSAGES))
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as http:
                while (await http.get("/v1/pool/status")).json()["queue"]["depth"] != 1:
                    pass  # each read is a round trip: the third request is on its way to the queue

            process.send_signal(signal.SIGTERM)  # the server's own 1 s timer ends the grace period
            with pytest.raises(openai.APIError) as cut_stream:
                async for _ in stream:
                    pass
            assert cut_stream.value.code == "shutting_down" and "shutting down" in cut_stream.value.message
            for request in (whole, queued):
                with pytest.raises(openai.InternalServerError) as cut:
                    await request
                assert cut.value.status_code == 503 and cut.value.code == "shutting_down"
            await client.close()
            rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode(errors="replace")
            assert await process.wait() == 0, "".join(log) + rest
            assert "Traceback" not in rest and "Exception in ASGI application" not in rest
            emulator.release()
    with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
        rows = db.execute("SELECT status, outcome, stream, account FROM usage ORDER BY stream, account").fetchall()
    assert rows == [(503, "shutting_down", 0, None), (503, "shutting_down", 0, "acct-1"),
                    (503, "shutting_down", 1, "acct-1")], "each is recorded as cut by the shutdown"


async def test_with_workers_too_what_runs_at_the_end_of_the_grace_period_gets_an_openai_error(
        tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    emulator = emulator_app.state.emulator
    async with serve(emulator_app) as emulator_url, gateway_process(
            tmp_path, emulator_url, "--workers", "2", "--shutdown-grace", "1",
            ready="kimi-pool ready: 2 workers") as (process, url, log):
        emulator.script("sk-emu-0001", [{"kind": "hold_after", "chunks": 2}, {"kind": "hold_after", "chunks": 0}])
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
            stream = await client.chat.completions.create(model=MODEL, stream=True, messages=MESSAGES)
            await anext(stream)
            forwarded = asyncio.ensure_future(client.chat.completions.create(  # a worker passes it to the keeper
                model=MODEL, messages=MESSAGES, extra_headers={"Idempotency-Key": "cut-1"}))
            await emulator.wait_for(lambda e: e.held == 2)
            process.send_signal(signal.SIGTERM)  # to the keeper, which stops its workers
            with pytest.raises(openai.APIError) as cut:
                async for _ in stream:
                    pass
            assert cut.value.code == "shutting_down"
            with pytest.raises(openai.InternalServerError) as cut_whole:
                await forwarded
            assert cut_whole.value.status_code == 503 and cut_whole.value.code == "shutting_down"
        assert process.stderr is not None
        rest = (await asyncio.wait_for(process.stderr.read(), 60)).decode(errors="replace")
        assert await process.wait() == 0, "".join(log) + rest
        assert "Traceback" not in rest and "Exception in ASGI application" not in rest
        emulator.release()
    with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
        rows = db.execute("SELECT status, outcome, stream FROM usage ORDER BY stream").fetchall()
    assert rows == [(503, "shutting_down", 0), (503, "shutting_down", 1)]


@pytest.mark.parametrize("workers", [1, 2])
async def test_ctrl_c_drains_then_exits_0_with_one_line_and_no_traceback(tmp_path: Path, workers: int) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    emulator = emulator_app.state.emulator
    ready = "Application startup complete" if workers == 1 else "kimi-pool ready: 2 workers"
    async with serve(emulator_app) as emulator_url, gateway_process(
            tmp_path, emulator_url, "--workers", str(workers), ready=ready) as (process, url, log):
        assert process.stderr is not None
        emulator.script("sk-emu-0001", [{"kind": "hold_after", "chunks": 2}])
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
            stream = await client.chat.completions.create(model=MODEL, stream=True, messages=MESSAGES)
            chunks = [await anext(stream)]
            await emulator.wait_for(lambda e: e.held == 1)
            process.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends (the workers have their own)
            await asyncio.wait_for(read_until(process.stderr, "Shutting down", log), 30)
            emulator.release()
            chunks += [chunk async for chunk in stream]
        assert chunks[-1].choices[0].finish_reason == "stop", "the stream in flight finished"
        rest = (await asyncio.wait_for(process.stderr.read(), 60)).decode(errors="replace")
        assert await process.wait() == 0, "".join(log) + rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert rest.splitlines()[-1].endswith("INFO kimi_pool: kimi-pool stopped on Ctrl-C (SIGINT); exit status 0")


async def test_an_anthropic_stream_and_message_cut_by_the_shutdown_end_in_anthropics_errors(tmp_path: Path) -> None:
    """Claude Code retries a 529 and must see an ``event: error`` on a stream that has begun."""
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    emulator = emulator_app.state.emulator
    async with serve(emulator_app) as emulator_url:
        accounts = accounts_toml(emulator_url, ["sk-emu-0001"], concurrency=2)
        async with gateway_process(tmp_path, emulator_url, "--shutdown-grace", "1", accounts=accounts) as (
                process, url, log):
            emulator.script("sk-emu-0001", [{"kind": "hold_after", "chunks": 2}, {"kind": "hold_after", "chunks": 0}])
            async with anthropic.AsyncAnthropic(base_url=url, api_key=MASTER_KEY, max_retries=0) as client:
                stream = await client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES, stream=True)
                await anext(stream)
                whole = asyncio.ensure_future(client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES))
                await emulator.wait_for(lambda e: e.held == 2)
                process.send_signal(signal.SIGTERM)
                with pytest.raises(anthropic.APIStatusError) as cut_stream:
                    async for _ in stream:
                        pass
                assert cut_stream.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
                assert "shutting down" in cut_stream.value.message
                with pytest.raises(anthropic.OverloadedError) as cut:
                    await whole
                assert cut.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
            assert process.stderr is not None
            rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode(errors="replace")
            assert await process.wait() == 0, "".join(log) + rest
            assert "Traceback" not in rest and "Exception in ASGI application" not in rest
            emulator.release()
