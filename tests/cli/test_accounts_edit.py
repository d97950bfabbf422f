"""``kimi-pool accounts edit`` and ``accounts reset-limits``: on real SQLite files, and against a running gateway
and the Moonshot emulator (the CLI runs in a thread: it has its own event loop)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli import run
from app.clock import ManualClock
from app.emulator.moonshot import MoonshotEmulator, MoonshotEmulatorConfig, create_moonshot_emulator, default_models
from app.pool.account import State
from tests.cli.test_main import SECRET, Cli
from tests.conftest import MASTER_KEY, Gateway, Stack, accounts_toml, reload, run_gateway, run_stack, serve

HELLO = [{"role": "user", "content": "hello"}]
MODEL = "kimi-k2-0905-preview"
NEW_SECRET = "sk-new-0123456789abcdefNEWKEY"


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


async def call(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(run, ["--db", stack.db_url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def views(cli: Cli) -> dict[str, dict[str, Any]]:
    return {view["name"]: view for view in cli.accounts()}


# --- edit, offline ----------------------------------------------------------------------------------


def test_edit_changes_fields_in_place_and_says_what_changed(cli: Cli) -> None:
    cli.ok("accounts", "add", "a", "--kind", "kimi-ai-chat", "--rpm", "10")
    out = cli.ok("accounts", "edit", "a", "--rpm", "60", "--weight", "2", "--concurrency", "3")
    assert out == "changed account a: rpm 10 -> 60; concurrency none -> 3; weight 1 -> 2\n"
    view = views(cli)["a"]
    assert (view["rpm"], view["concurrency"], view["weight"], view["config_rev"]) == (60, 3, 2.0, 2)
    assert "rpm=60" in cli.ok("accounts", "list")

    assert cli.ok("accounts", "edit", "a", "--unset", "rpm", "--unset", "weight") == \
        "changed account a: rpm 60 -> none; weight 2 -> 1\n"
    assert cli.ok("accounts", "edit", "a", "--concurrency", "3") == "account a unchanged\n"
    assert views(cli)["a"]["config_rev"] == 3


def test_a_new_key_is_masked_and_the_old_one_leaves_the_files(cli: Cli) -> None:
    cli.ok("accounts", "add", "m", "--kind", "moonshot", "--api-key", SECRET, "--no-discover")
    out = cli.ok("accounts", "edit", "m", "--api-key", NEW_SECRET, "--no-discover")
    assert out == "changed account m: key sk-l…CRET -> sk-n…WKEY\n"
    assert views(cli)["m"]["key"] == "sk-n…WKEY"
    stored = cli.stored_bytes()
    assert SECRET.encode() not in stored and NEW_SECRET.encode() in stored


@pytest.mark.parametrize(("args", "message"), [
    (["--rpm", "0"], "account a: rpm must be a positive whole number, not 0"),
    (["--proxy", "gopher://p"], "bad proxy for account a 'gopher://p'"),
    (["--keep-chats"], "account a: option keep_chats is for kimi-web accounts, not kimi-ai-chat"),
    (["--unset", "colour"], "cannot unset 'colour': one of rpm, tpm, tpd, concurrency, weight, base-url, proxy, "
                            "models, max-message-chars, keep-chats"),
    (["--rpm", "5", "--unset", "rpm"], "give --rpm or --unset rpm, not both"),
    (["--api-key", "a", "--token", "b"], "give only one of --api-key and --token"),
    ([], "nothing to change: give the options to change (see 'kimi-pool accounts edit --help')"),
])
def test_edit_mistakes_are_one_line_and_change_nothing(cli: Cli, args: list[str], message: str) -> None:
    cli.ok("accounts", "add", "a", "--kind", "kimi-ai-chat")
    assert cli.fails("accounts", "edit", "a", *args).startswith(message)
    assert views(cli)["a"]["config_rev"] == 1


def test_edit_of_an_unknown_account(cli: Cli) -> None:
    cli.ok("db", "upgrade")
    assert cli.fails("accounts", "edit", "nope", "--rpm", "5") == f"no account named nope (database {cli.path})"


# --- edit, with a running gateway -------------------------------------------------------------------


async def test_a_dead_key_replaced_comes_back_with_the_models_its_upstream_lists(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001", "sk-emu-0002"],
                         emulator=MoonshotEmulatorConfig.simple(3)) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "auth"}])
        raw = await stack.client().chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
        assert raw.headers["x-kimi-pool-account"] == "acct-2", "acct-1's key was rejected: it failed over"
        assert stack.gateway.pool.accounts["acct-1"].state is State.AUTH_DEAD
        await stack.app.state.writer.flush()

        code, out, err = await call(stack, capsys, "accounts", "edit", "acct-1", "--api-key", "sk-emu-0003")
        assert (code, err) == (0, "")
        assert out == f"changed account acct-1: key **** -> ****, serves the {len(default_models())} " \
                      "model(s) its upstream lists\n"  # keys this short are masked whole
        await reload(stack)
        assert stack.gateway.pool.accounts["acct-1"].state is State.ACTIVE, "a new key gets a fresh start"
        served = {(await stack.client().chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO)).headers["x-kimi-pool-account"] for _ in range(2)}
        assert served == {"acct-1", "acct-2"}
        assert stack.emulator.snapshot()["keys"]["sk-emu-0003"]["requests"] == 1


# --- learned limits: shown, forgotten, kept across a restart ------------------------------------------


async def learn_rpm_3(gateway: Gateway, emulator: MoonshotEmulator) -> None:
    """One scripted 429 saying "max RPM: 3" (the emulator's wording): acct-1 is paced at 3 RPM from then on."""
    emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 1}])
    raw = await gateway.client().chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    assert raw.headers["x-kimi-pool-account"] == "acct-2"
    assert gateway.gateway.pool.accounts["acct-1"].limits.effective["rpm"] == 3


async def pool_limits(stack: Stack, name: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as http:
        status = (await http.get("/v1/pool/status")).json()
    [account] = [a for a in status["accounts"] if a["name"] == name]
    return account["limits"]  # type: ignore[no-any-return]


async def test_learned_limits_are_listed_and_reset_limits_makes_the_server_forget_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the CLI reads the system clock: the server's (manual) clock starts there, as a real server's would
    async with run_stack(tmp_path, keys=["sk-emu-0001", "sk-emu-0002"], clock=ManualClock(time.time()),
                         emulator=MoonshotEmulatorConfig.simple(2)) as stack:
        await learn_rpm_3(stack, stack.emulator)
        await stack.app.state.writer.flush()

        code, out, err = await call(stack, capsys, "accounts", "list", "--json")
        assert (code, err) == (0, ""), err
        [view] = [v for v in json.loads(out) if v["name"] == "acct-1"]
        assert (view["rpm"], view["effective_limits"]["rpm"], view["learned_limits"]["rpm"]["limit"]) == (None, 3, 3)
        _, table, _ = await call(stack, capsys, "accounts", "list")
        assert "rpm=3 (learned)" in table

        code, out, err = await call(stack, capsys, "accounts", "reset-limits", "acct-1")
        assert (code, out, err) == (0, "forgot the limits learned for account acct-1 (rpm=3)\n", "")
        await reload(stack)
        assert stack.gateway.pool.accounts["acct-1"].limits.effective["rpm"] is None
        assert (await pool_limits(stack, "acct-1"))["rpm"] is None
        await stack.app.state.writer.flush()
        _, out, _ = await call(stack, capsys, "accounts", "list", "--json")
        [view] = [v for v in json.loads(out) if v["name"] == "acct-1"]
        assert (view["effective_limits"]["rpm"], view["learned_limits"]) == (None, {})

        code, out, _ = await call(stack, capsys, "accounts", "reset-limits", "acct-2")
        assert out == "account acct-2 had no learned limits stored; a running server forgets any it holds\n"


async def test_a_limit_learned_but_not_yet_written_is_forgotten_too(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001", "sk-emu-0002"], clock=ManualClock(time.time()),
                         emulator=MoonshotEmulatorConfig.simple(2)) as stack:
        await learn_rpm_3(stack, stack.emulator)  # queued in the write-behind, not in the database yet
        code, out, _ = await call(stack, capsys, "accounts", "reset-limits", "acct-1")
        assert code == 0 and "had no learned limits stored" in out
        await stack.app.state.writer.flush()  # the queued write loses against the reset
        await reload(stack)
        assert stack.gateway.pool.accounts["acct-1"].limits.effective["rpm"] is None
        _, out, _ = await call(stack, capsys, "accounts", "list", "--json")
        assert {v["name"]: v["learned_limits"] for v in json.loads(out)}["acct-1"] == {}


async def test_learned_limits_survive_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    emulator = create_moonshot_emulator(MoonshotEmulatorConfig.simple(2), clock=clock)
    async with serve(emulator) as url:
        toml = accounts_toml(url, ["sk-emu-0001", "sk-emu-0002"])
        async with run_gateway(tmp_path, toml, clock=clock) as gateway:
            await learn_rpm_3(gateway, emulator.state.emulator)
        async with run_gateway(tmp_path, toml, clock=clock) as gateway:
            assert gateway.gateway.pool.accounts["acct-1"].limits.effective["rpm"] == 3, \
                "what was learned before the restart paces the account after it"
