"""SIGTERM on a real ``kimi-pool serve`` process: in-flight streams finish, usage is stored, exit 0."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import httpx
import openai
import pytest

from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import MASTER_KEY, gateway_process, read_until, serve

MODEL = "kimi-k2-0905-preview"


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


async def test_a_stream_that_outlives_the_grace_period_is_cut_and_recorded(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    emulator = emulator_app.state.emulator
    async with serve(emulator_app) as emulator_url, \
            gateway_process(tmp_path, emulator_url, "--shutdown-grace", "1") as (process, url, log):
        assert process.stderr is not None
        emulator.script("sk-emu-0001", [{"kind": "hold_after", "chunks": 2}])  # never released
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0)
        stream = await client.chat.completions.create(model=MODEL, stream=True,
                                                      messages=[{"role": "user", "content": "hello"}])
        await anext(stream)
        await emulator.wait_for(lambda e: e.held == 1)
        process.send_signal(signal.SIGTERM)
        with pytest.raises((openai.APIError, httpx.HTTPError)):  # the server's own 1 s timer ends it
            async for _ in stream:
                pass
        await client.close()
        rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode(errors="replace")
        assert await process.wait() == 0, "".join(log) + rest
        emulator.release()
    with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
        rows = db.execute("SELECT status, outcome FROM usage").fetchall()
    assert rows == [(499, "client_closed")], "the cut stream is still recorded"
