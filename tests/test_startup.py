"""What a real ``kimi-pool serve`` says when it starts: version, database, accounts by state and kind, models,
who may call, the dashboard; with no enabled account, the commands that add or enable one. Said once, also
with ``--workers``."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from app import __version__
from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import gateway_process, serve

SUMMARY = "kimi_pool: "


def said(log: list[str]) -> list[str]:
    """The kimi_pool logger's lines, without time and level."""
    return [line.split(SUMMARY, 1)[1].rstrip("\n") for line in log if SUMMARY in line]


async def stop(process: asyncio.subprocess.Process, log: list[str]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    log += (await asyncio.wait_for(process.stderr.read(), 60)).decode().splitlines(keepends=True)
    assert await process.wait() == 0


async def test_the_start_summary(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url:
        accounts = (f'[[accounts]]\nname = "acct-1"\nkind = "moonshot"\napi_key = "sk-emu-0001"\n'
                    f'base_url = "{emulator_url}/v1"\n\n[[accounts]]\nname = "off"\nkind = "kimi-ai-chat"\n'
                    f'enabled = false\n')
        async with gateway_process(tmp_path, emulator_url, accounts=accounts) as (process, url, log):
            await stop(process, log)
    lines = said(log)
    start = next(i for i, line in enumerate(lines) if line.startswith("kimi-pool "))
    assert lines[start:start + 4] == [
        f"kimi-pool {__version__} serving {url}; database {tmp_path / 'kimi-pool.db'}",
        "accounts: 2 (kimi-ai-chat 1, moonshot 1); 1 active, 1 disabled (off)",
        "models served: kimi-k2, kimi-k2-0905-preview, kimi-k2-thinking, kimi-k2-thinking-turbo, "
        "kimi-k2-turbo-preview, kimi-k2.5, kimi-k2.6, kimi-k2.7-code, kimi-k3, moonshot-v1-128k, moonshot-v1-32k, "
        "moonshot-v1-8k",
        f"gateway keyed: the master key and 0 client keys; dashboard {url}/dashboard",
    ]
    assert not any("no enabled account" in line for line in lines)
    assert lines[-1] == "kimi-pool stopped on SIGTERM; exit status 0"


async def test_with_no_enabled_account_it_says_how_to_add_one_and_once_with_workers(tmp_path: Path) -> None:
    async with gateway_process(tmp_path, "http://127.0.0.1:9", "--workers", "2", accounts="", master_key=None,
                               ready="kimi-pool ready: 2 workers") as (process, url, log):
        await stop(process, log)
    lines = said(log)
    assert [line for line in lines if line.startswith("kimi-pool 0")] == [
        f"kimi-pool {__version__} serving {url} with 2 workers; database {tmp_path / 'kimi-pool.db'}"], "once"
    assert "accounts: none" in lines and "models served: none" in lines
    assert (f"gateway open: no master key and no client key, so it answers on loopback only; dashboard "
            f"{url}/dashboard (it needs the master key: set KIMI_POOL_MASTER_KEY)") in lines
    [warning] = [line for line in log if "no accounts:" in line]
    assert " WARNING " in warning
    assert ("every request will fail until one is added: kimi-pool --db URL accounts add NAME --kind moonshot "
            "--api-key env:VAR") in warning
    assert "kimi-pool --db URL accounts import FILE" in warning
