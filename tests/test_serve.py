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
        port = url.rsplit(":", 1)[1]
        assert await title(process.pid) == f"kimi-pool serve 127.0.0.1:{port}", "not python -c …"


async def title(pid: int) -> str:
    """What ps shows for the process: its command line (``/proc/PID/cmdline``), arguments joined by spaces."""
    raw = await asyncio.to_thread(Path(f"/proc/{pid}/cmdline").read_bytes)
    return b" ".join(part for part in raw.split(b"\0") if part).decode()


async def test_the_keeper_and_its_workers_say_what_they_are(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url, gateway_process(
            tmp_path, emulator_url, "--workers", "2", ready="kimi-pool ready: 2 workers") as (process, url, _log):
        port = url.rsplit(":", 1)[1]
        assert await title(process.pid) == f"kimi-pool serve 127.0.0.1:{port}"
        children = (await asyncio.to_thread(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text)).split()
        assert sorted([await title(int(pid)) for pid in children]) == ["kimi-pool worker 0", "kimi-pool worker 1"]
        assert await asyncio.to_thread(Path(f"/proc/{process.pid}/comm").read_text) == "kimi-pool serve\n"


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
