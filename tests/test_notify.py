"""Changes made with the CLI reach a running server at once, workers included: the CLI tells the
server over the Unix socket beside the SQLite file and returns once every process has reloaded.
Real ``kimi-pool serve`` children, the real CLI, the openai SDK and httpx."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.cli import run
from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from app.notify import socket_path, tell_server
from tests.conftest import MASTER_KEY, accounts_toml, gateway_process, read_until, serve

MODEL = "kimi-k2-0905-preview"
HELLO: Any = [{"role": "user", "content": "hello"}]
CHAT = {"model": MODEL, "messages": HELLO}


async def cli(db_url: str, *args: str) -> int:
    return await asyncio.to_thread(run, ["--db", db_url, *args])


async def answered_by(url: str, key: str = MASTER_KEY) -> str:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    return raw.headers["x-kimi-pool-account"]


async def test_a_key_revoked_and_an_account_disabled_with_the_cli_take_effect_on_every_worker_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db"
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=2))
    async with serve(emulator_app) as emulator_url:
        accounts = accounts_toml(emulator_url, ["sk-emu-0001", "sk-emu-0002"])
        async with gateway_process(tmp_path, emulator_url, "--workers", "2", accounts=accounts,
                                   ready="kimi-pool ready: 2 workers") as (process, url, log):
            path = socket_path(db_url)
            assert path is not None and stat.S_IMODE(os.stat(path).st_mode) == 0o600, "only its user may tell it"

            assert await cli(db_url, "keys", "create", "team-a") == 0
            found = re.search(r"kp-[A-Za-z0-9_-]{20,}", capsys.readouterr().out)
            assert found is not None
            key = found.group(0)
            assert await answered_by(url, key), "a key made with the CLI works at once"

            assert await cli(db_url, "keys", "revoke", "team-a") == 0
            assert capsys.readouterr().err == "", "the server confirmed: no warning"
            workers: dict[str, str] = {}
            for attempt in range(24):
                # one connection, so one worker: a request that names itself, then the revoked key
                async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1)) as http:
                    ok = await http.post("/v1/chat/completions", json=CHAT, headers={
                        "Authorization": f"Bearer {MASTER_KEY}", "X-Request-Id": f"probe-{attempt:02d}"})
                    assert ok.status_code == 200
                    refused = await http.post("/v1/chat/completions", json=CHAT,
                                              headers={"Authorization": f"Bearer {key}"})
                    assert refused.status_code == 401, refused.text
                    assert refused.json()["error"]["code"] == "invalid_api_key"
                marker = f"request_id=probe-{attempt:02d}"
                if not any(marker in line for line in log):
                    await asyncio.wait_for(read_until(process.stderr, marker, log), 30)
                line = next(line for line in log if marker in line)
                workers[marker] = re.findall(r"worker=(\d)", line)[0]
                if len(set(workers.values())) == 2 and attempt >= 3:
                    break
            assert set(workers.values()) == {"0", "1"}, "both workers refused it (else this proves nothing)"

            assert await cli(db_url, "accounts", "disable", "acct-1") == 0
            assert {await answered_by(url) for _ in range(8)} == {"acct-2"}, "the next request avoids acct-1"
            assert await cli(db_url, "accounts", "enable", "acct-1") == 0
            assert {await answered_by(url) for _ in range(4)} == {"acct-1", "acct-2"}


async def test_the_cli_works_without_a_server_and_past_a_killed_one_s_socket(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db"
    path = socket_path(db_url)
    assert path == tmp_path / "kimi-pool.db.sock"
    assert await cli(db_url, "db", "upgrade") == 0
    capsys.readouterr()
    assert await cli(db_url, "keys", "create", "nobody-listens") == 0
    assert capsys.readouterr().err.startswith("key nobody-listens created"), "no warning: no server, nothing to tell"

    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url:
        async with gateway_process(tmp_path, emulator_url) as (process, _url, _log):
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            process.kill()
            await process.wait()
        assert stat.S_ISSOCK(os.lstat(path).st_mode), "a killed server leaves its socket behind"
        assert await cli(db_url, "accounts", "disable", "acct-1") == 0
        assert "warning" not in capsys.readouterr().err, "a socket nobody listens on is no server"

        async with gateway_process(tmp_path, emulator_url) as (process, url, _log):  # takes the stale socket over
            assert await cli(db_url, "accounts", "enable", "acct-1") == 0
            assert await answered_by(url) == "acct-1", "the new server was told"
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 30) == 0
        assert not path.exists(), "a clean stop removes its socket"


async def test_a_server_that_does_not_answer_is_a_warning_not_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db"
    path = socket_path(db_url)
    assert path is not None
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never answers
    silent.bind(os.fspath(path))
    silent.listen(1)
    try:
        assert await tell_server(db_url, timeout=0.2) == "the running server did not confirm the change within 0.2 s"
    finally:
        silent.close()


@pytest.fixture
def long_dir(tmp_path: Path) -> Iterator[Path]:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    yield deep


def test_where_the_socket_is(tmp_path: Path, long_dir: Path) -> None:
    assert socket_path(f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db") == tmp_path / "kimi-pool.db.sock"
    far = socket_path(f"sqlite+aiosqlite:///{long_dir}/kimi-pool.db")
    assert far is not None and len(os.fsencode(far)) <= 100, "too long beside the file: a private directory"
    assert far.parent.name == f"kimi-pool-{os.getuid()}"
    assert far == socket_path(f"sqlite+aiosqlite:///{long_dir}/../{long_dir.name}/kimi-pool.db"), "one file, one path"
    assert socket_path("postgresql+asyncpg://u:p@db/kimi") is None, "other databases: the sync interval"
    assert socket_path("sqlite+aiosqlite://") is None and socket_path("sqlite+aiosqlite:///:memory:") is None


async def test_the_fallback_directory_is_private(tmp_path: Path, long_dir: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{long_dir}/kimi-pool.db"
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url:
        async with gateway_process(long_dir, emulator_url) as (process, url, _log):
            path = socket_path(db_url)
            assert path is not None and path.exists()
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
            assert await cli(db_url, "accounts", "disable", "acct-1") == 0
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as http:
                status = (await http.get("/v1/pool/status")).json()
            assert status["accounts"][0]["state"] == "disabled"
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 30) == 0
        assert not path.exists()
