"""What the operator does with the CLI reaches a running server within one sync interval."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

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


async def test_an_env_secret_the_server_lacks_is_a_warning_and_shows_as_auth_dead_until_it_is_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KP_SYNC_KEY", raising=False)
    with caplog.at_level(logging.INFO, logger="kimi_pool.sync"):
        async with run_stack(tmp_path, keys=["env:KP_SYNC_KEY", "sk-emu-0002"]) as stack:
            unset = "account acct-1 takes no traffic: the secret reference env:KP_SYNC_KEY points at an unset " \
                    "environment variable in the server's environment"
            assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [unset]
            for _ in range(2):
                await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
            assert stack.emulator.snapshot()["keys"]["sk-emu-0002"]["requests"] == 2

            capsys.readouterr()
            assert await cli(stack.db_url, "accounts", "list", "--json") == 0
            views = {view["name"]: view for view in json.loads(capsys.readouterr().out)}
            assert (views["acct-1"]["state"], views["acct-1"]["reason"]) == ("auth_dead", unset.split(": ", 1)[1])
            assert views["acct-2"]["state"] == "active"

            monkeypatch.setenv("KP_SYNC_KEY", "sk-emu-0001")  # what a restart with the variable set would see
            assert await cli(stack.db_url, "accounts", "edit", "acct-1", "--rpm", "100") == 0
            await reload(stack)
            assert "account acct-1: its credential loads again" in caplog.text
            capsys.readouterr()
            assert await cli(stack.db_url, "accounts", "list", "--json") == 0
            views = {view["name"]: view for view in json.loads(capsys.readouterr().out)}
            assert (views["acct-1"]["state"], views["acct-1"]["reason"]) == ("active", None)
            assert stack.gateway.pool.accounts["acct-1"].state is State.ACTIVE
