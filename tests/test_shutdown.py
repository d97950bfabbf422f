"""SIGTERM on a real ``kimi-pool serve`` process: in-flight streams finish, usage is stored, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import MASTER_KEY, serve

MODEL = "kimi-k2-0905-preview"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_until(stream: asyncio.StreamReader, marker: str, seen: list[str]) -> None:
    """Read the server's log lines until one contains ``marker`` (no polling: each read waits)."""
    while True:
        line = (await stream.readline()).decode(errors="replace")
        if not line:
            raise AssertionError(f"the server's log ended before {marker!r}:\n{''.join(seen)}")
        seen.append(line)
        if marker in line:
            return


@contextlib.asynccontextmanager
async def gateway_process(tmp_path: Path, emulator_url: str, *args: str) -> AsyncIterator[tuple[
        asyncio.subprocess.Process, str, list[str]]]:
    toml = tmp_path / "accounts.toml"
    toml.write_text(f'[[accounts]]\nname = "acct-1"\nkind = "moonshot"\napi_key = "sk-emu-0001"\n'
                    f'base_url = "{emulator_url}/v1"\n')
    port = free_port()
    env = {**os.environ, "KIMI_POOL_MASTER_KEY": MASTER_KEY}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "--db", f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db", "serve",
        "--port", str(port), "--accounts", str(toml), *args,
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, env=env)
    assert process.stderr is not None
    log: list[str] = []
    try:
        await asyncio.wait_for(read_until(process.stderr, "Application startup complete", log), 60)
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


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
