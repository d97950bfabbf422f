"""What the operator does with the CLI reaches a running server within one sync interval."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.cli import run
from app.pool.account import State
from tests.conftest import reload, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]


async def cli(stack_db: str, *args: str) -> int:
    return await asyncio.to_thread(run, ["--db", stack_db, *args])


async def test_disabling_an_account_stops_its_traffic_and_enabling_revives_a_dead_one(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        assert await cli(stack.db_url, "accounts", "disable", "acct-1", "--reason", "rotating key") == 0
        await reload(stack)
        assert stack.gateway.pool.accounts["acct-1"].state is State.DISABLED
        for _ in range(6):
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert stack.emulator.snapshot()["keys"].get("sk-emu-0001", {}).get("requests", 0) == 0

        assert await cli(stack.db_url, "accounts", "enable", "acct-1") == 0
        await reload(stack)
        for _ in range(3):
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert stack.emulator.snapshot()["keys"]["sk-emu-0001"]["requests"] == 1


async def test_added_and_removed_accounts_join_and_leave_the_pool(tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"], account_extra={"models": [MODEL]}) as stack:
        code = await cli(stack.db_url, "accounts", "add", "late", "--kind", "moonshot", "--api-key", "sk-emu-0002",
                         "--base-url", stack.emulator_url + "/v1", "--model", "kimi-k2-turbo-preview")
        assert code == 0
        await reload(stack)
        models = {m.id for m in (await stack.client().models.list()).data}
        assert "kimi-k2-turbo-preview" in models
        await stack.client().chat.completions.create(model="kimi-k2-turbo-preview", messages=HELLO)
        assert stack.emulator.snapshot()["keys"]["sk-emu-0002"]["requests"] == 1

        assert await cli(stack.db_url, "accounts", "remove", "late") == 0
        await reload(stack)
        models = {m.id for m in (await stack.client().models.list()).data}
        assert "kimi-k2-turbo-preview" not in models
