"""Models come from the upstream: a running gateway serves what each Moonshot account's ``GET /v1/models``
lists, at start and after every refresh, with the Moonshot emulator changing its list at runtime."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path

import httpx
import openai
import pytest

from app.accounts_config import DEFAULT_MODELS
from app.cli import run
from app.emulator.moonshot import MoonshotEmulatorConfig, default_models
from tests.conftest import MASTER_KEY, Stack, run_stack

HELLO = [{"role": "user", "content": "hello"}]
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
HOUR = 3600.0


async def served(stack: Stack) -> set[str]:
    return {model.id async for model in stack.client().models.list()}


async def refreshed(stack: Stack) -> None:
    """Let the gateway's hourly refresh run once, by moving the clock an hour, not sleeping."""
    discovery = stack.app.state.discovery
    runs = discovery.runs
    stack.clock.advance(stack.gateway.settings.models_refresh)
    await discovery.wait_runs(runs + 1)


async def catalogue(stack: Stack) -> dict[str, dict[str, object]]:
    async with httpx.AsyncClient(base_url=stack.url, headers=AUTH) as http:
        listing = (await http.get("/admin/models")).json()["data"]
    return {entry["model"]: entry for entry in listing}


async def test_at_start_the_gateway_serves_what_the_upstream_lists_not_the_builtin_list(tmp_path: Path) -> None:
    config = MoonshotEmulatorConfig.simple(2, models=dict([("kimi-k3", default_models()["kimi-k3"]),
                                                           ("kimi-k4", default_models()["kimi-k3"])]))
    async with run_stack(tmp_path, emulator=config) as stack:
        assert await served(stack) == {"kimi-k3", "kimi-k4"}, "kimi-k4 is in no list in the code"
        answer = await stack.client().chat.completions.create(model="kimi-k4", messages=HELLO)
        assert answer.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as caught:
            await stack.client().chat.completions.create(model="kimi-k2.5", messages=HELLO)
        assert "GET /v1/models lists the models served" in caught.value.message
        assert stack.emulator.snapshot()["totals"]["requests"] == 1, "the unserved model never reached the upstream"


async def test_a_model_the_upstream_adds_or_retires_is_offered_or_refused_after_the_refresh(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with run_stack(tmp_path) as stack:
        assert await served(stack) >= {"kimi-k2.5", "kimi-k2-0905-preview", "kimi-k2-thinking-turbo"}
        # Moonshot retires kimi-k2.5 and the K2 previews and brings kimi-k4
        stack.emulator.configure({"models": ["kimi-k3", "kimi-k2.6", "kimi-k4:1048576:default_on:vision"]})
        assert "kimi-k4" not in await served(stack), "nothing changes before the refresh"
        with caplog.at_level(logging.INFO, logger="kimi_pool.discovery"):
            await refreshed(stack)
        assert await served(stack) == {"kimi-k3", "kimi-k2.6", "kimi-k4"}
        assert "account acct-1: its upstream serves 3 model(s) (+kimi-k4, -kimi-k2.5" in caplog.text

        answer = await stack.client().chat.completions.create(model="kimi-k4", messages=HELLO)
        assert answer.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as caught:
            await stack.client().chat.completions.create(model="kimi-k2.5", messages=HELLO)
        assert caught.value.code == "model_not_found"
        assert "The model 'kimi-k2.5' is not served by this kimi-pool" in caught.value.message
        assert "GET /v1/models" in caught.value.message and "kimi-pool models list" in caught.value.message
        with pytest.raises(openai.NotFoundError):  # the built-in alias pointed at a retired id
            await stack.client().chat.completions.create(model="kimi-k2", messages=HELLO)

        entries = await catalogue(stack)
        assert entries["kimi-k2"]["accounts"] == []
        assert entries["kimi-k2"]["warning"] == \
            "no account serves it (moonshot accounts do not offer kimi-k2-0905-preview; no kimi-web or " \
            "kimi-ai-chat account)"
        assert entries["kimi-k4"]["warning"] is None and entries["kimi-k4"]["alias"] is None


async def test_lists_are_asked_again_only_when_an_hour_old_and_a_failing_upstream_keeps_its_list(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with run_stack(tmp_path) as stack:
        discovery = stack.app.state.discovery
        assert [found.name for found in await discovery.refresh(due=True)] == [], "all were asked at start"
        before = await served(stack)
        with socket.socket() as closed:  # bound, never listening: connections are refused
            closed.bind(("127.0.0.1", 0))
            gone = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
            async with httpx.AsyncClient(base_url=stack.url, headers=AUTH) as http:
                patched = await http.patch("/admin/accounts/acct-1", json={"base_url": gone})
            assert patched.status_code == 200
            assert "unreachable" in patched.json()["discovery_error"]
            with caplog.at_level(logging.WARNING, logger="kimi_pool.discovery"):
                await refreshed(stack)
                await refreshed(stack)
        warnings = [r for r in caplog.records if r.name == "kimi_pool.discovery" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, "one warning while it keeps failing, not one an hour"
        assert stack.gateway.pool.accounts["acct-1"].models >= {"kimi-k2.5", "kimi-k2-thinking-turbo"}, \
            "it keeps the list it had"
        assert await served(stack) == before


async def test_an_accounts_own_model_list_is_never_replaced_nor_asked(tmp_path: Path) -> None:
    async with run_stack(tmp_path, account_extra={"models": ["kimi-k2.5"]}) as stack:
        stack.emulator.configure({"models": ["kimi-k3"]})
        await refreshed(stack)
        assert await served(stack) == {"kimi-k2.5"}
        async with httpx.AsyncClient(base_url=stack.url, headers=AUTH) as http:
            [view, *_] = (await http.get("/admin/accounts")).json()["data"]
        assert (view["models_source"], view["serves"], view["discovered_models"]) == \
            ("configured", ["kimi-k2.5"], None)


async def test_the_cli_shows_where_each_accounts_models_come_from(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"]) as stack:
        code = await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "add", "chat", "--kind",
                                             "kimi-ai-chat", "--base-url", stack.emulator_url])
        assert code == 0
        assert capsys.readouterr().out == "added account chat (kimi-ai-chat)\n", "kimi-ai-chat lists no models"
        assert await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "list", "--json"]) == 0
        views = {view["name"]: view for view in json.loads(capsys.readouterr().out)}
        assert (views["acct-1"]["models_source"], views["acct-1"]["serves"]) == ("upstream", list(default_models()))
        assert (views["chat"]["models_source"], views["chat"]["serves"]) == \
            ("default", list(DEFAULT_MODELS["kimi-ai-chat"]))
        assert await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "list"]) == 0
        table = capsys.readouterr().out
        assert f"{len(default_models())} from upstream" in table and "default" in table


async def test_models_refresh_zero_never_asks(tmp_path: Path) -> None:
    async with run_stack(tmp_path, settings={"models_refresh": 0}) as stack:
        assert "kimi-k2-thinking-turbo" not in await served(stack), "the emulator lists it; the code's list does not"
        assert stack.app.state.discovery.runs == 0
