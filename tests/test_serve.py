"""``kimi-pool serve`` checks and migrates in the command's process, then becomes the server: same pid,
a fresh interpreter that never loads the command line's libraries (the memory a server keeps idle)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import MASTER_KEY, gateway_process, serve


async def test_the_server_is_the_command_without_the_cli_libraries(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url, gateway_process(tmp_path, emulator_url) as (process, url, _log):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as http:
            reply = await http.post("/v1/chat/completions", json={
                "model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "hello"}]})
        assert reply.status_code == 200, "the process the command started serves"
        maps = await asyncio.to_thread(Path(f"/proc/{process.pid}/maps").read_text)
        assert "_pydantic_core" not in maps, "typer's pydantic (and typer, rich) stay in the command line's process"
        assert "/uvloop/" in maps and "/httptools/" in maps, "what the server needs is loaded"
        command = (await asyncio.to_thread(Path(f"/proc/{process.pid}/cmdline").read_bytes)).split(b"\0")
        assert b"serve" in command and MASTER_KEY.encode() not in b" ".join(command)


def test_a_port_already_taken_ends_serve_in_one_line(tmp_path: Path) -> None:
    with contextlib.closing(socket.create_server(("127.0.0.1", 0))) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "app", "--db", f"sqlite+aiosqlite:///{tmp_path}/k.db", "serve", "--port",
             str(port)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "address already in use" in done.stderr.lower()


async def test_serve_asks_the_upstream_for_its_models_unless_told_not_to(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    emulator_app.state.emulator.configure({"models": ["kimi-k3", "kimi-k4:1048576:default_on"]})
    async with serve(emulator_app) as emulator_url:
        served: dict[str, set[str]] = {}
        for run, args in (("asks", ()), ("never", ("--models-refresh", "0"))):
            (tmp_path / run).mkdir()
            async with gateway_process(tmp_path / run, emulator_url, *args) as (_process, url, _log):
                async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as http:
                    served[run] = {model["id"] for model in (await http.get("/v1/models")).json()["data"]}
    assert served["asks"] == {"kimi-k3", "kimi-k4"}, "from the first request: the server asked before it served"
    assert "kimi-k4" not in served["never"] and "kimi-k2.5" in served["never"], "the kind's usual list"
