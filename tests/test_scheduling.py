"""Scheduling end to end: the gateway and the emulator with tight limits, the openai SDK, a manual clock."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from app.cli import run
from app.emulator.moonshot import MoonshotEmulatorConfig, Org, OrgLimits
from app.errors import RateLimited
from app.pool.account import State
from tests.conftest import MASTER_KEY, Stack, reload, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]


async def drain(stack: Stack, tasks: list[asyncio.Task[object]], rounds: int, per_round: int) -> None:
    """Let held upstream answers go, ``per_round`` at a time, as the emulator receives them."""
    for done in range(rounds):
        await stack.emulator.wait_for(
            lambda e, done=done: e.held == per_round and e.stats.totals.completed == done * per_round)
        stack.emulator.release()
    await asyncio.gather(*tasks)


async def test_a_burst_is_paced_under_every_limit_and_the_upstream_never_says_429(tmp_path: Path) -> None:
    config = MoonshotEmulatorConfig.simple(keys=3, concurrency=1, rpm=4)
    async with run_stack(tmp_path, emulator=config, account_extra={"rpm": 4, "concurrency": 1},
                         settings={"max_wait": 120}) as stack:
        stack.emulator.script(None, [{"kind": "hold_after", "chunks": 0}] * 12)  # slow completions
        client = stack.client()
        tasks = [asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO))
                 for _ in range(12)]
        await drain(stack, tasks, rounds=4, per_round=3)  # type: ignore[arg-type]
        assert all(t.result().choices[0].message.content for t in tasks)  # type: ignore[attr-defined]
        seen = stack.emulator.snapshot()
        assert seen["totals"]["by_status"] == {"200": 12}, "not one 429 upstream"
        assert [org["peak_in_flight"] for org in seen["orgs"].values()] == [1, 1, 1]

        # the pool is full for this minute: a 13th that may wait 1 s is refused at once, honestly
        async with stack.http() as http:
            refused = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                                      headers={"Authorization": f"Bearer {MASTER_KEY}", "X-Kimi-Pool-Max-Wait": "1"})
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.headers["retry-after"] == "60"  # a minute (whole seconds, capped at 60)
        assert stack.emulator.snapshot()["totals"]["requests"] == 12, "it never reached the upstream"

        # and a request that may wait is served when the minute rolls over, without polling
        waiting = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO))
        await stack.gateway.admission.wait_depth(1)
        stack.clock.advance(61)
        assert (await waiting).choices[0].message.content


async def test_an_account_configured_above_the_upstream_limit_gets_one_429_then_is_paced(tmp_path: Path) -> None:
    config = MoonshotEmulatorConfig(
        orgs={"tight": Org("tight", OrgLimits(rpm=2)), "roomy": Org("roomy", OrgLimits())},
        keys={"sk-tight-000000000000": "tight", "sk-roomy-000000000000": "roomy"})
    keys = ["sk-tight-000000000000", "sk-roomy-000000000000"]
    async with run_stack(tmp_path, emulator=config, keys=keys, account_extra={"rpm": 10}) as stack:
        client = stack.client()
        for _minute in range(3):
            for _ in range(8):
                assert (await client.chat.completions.create(model=MODEL, messages=HELLO)).choices
            stack.clock.advance(61)
        seen = stack.emulator.snapshot()
        assert seen["totals"]["by_status"].get("429") == 1, "one 429 taught the pool the real limit"
        assert seen["orgs"]["tight"]["requests"] == 7  # 2 + its refused third in minute 1, then 2 a minute
        assert stack.gateway.pool.accounts["acct-1"].limits.effective["rpm"] == 2


async def test_a_conversation_stays_on_its_account_and_moves_when_that_account_is_disabled(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        headers = {"Authorization": f"Bearer {MASTER_KEY}", "X-Session-Id": "conversation-1"}
        body = {"model": MODEL, "messages": HELLO}
        served = {(await http.post("/v1/chat/completions", json=body, headers=headers))
                  .headers["x-kimi-pool-account"] for _ in range(5)}
        assert len(served) == 1
        home = served.pop()
        assert await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "disable", home]) == 0
        await reload(stack)
        moved = (await http.post("/v1/chat/completions", json=body, headers=headers)).headers["x-kimi-pool-account"]
        assert moved != home
        again = (await http.post("/v1/chat/completions", json=body, headers=headers)).headers["x-kimi-pool-account"]
        assert again == moved, "the binding was rewritten"
        bound = [b.account for b in stack.gateway.sessions.for_account(moved)]
        assert bound == [moved]


async def test_a_chat_ui_conversation_without_a_session_id_stays_together(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Plan a trip."}]
        served = set()
        for turn in range(4):
            history += [{"role": "assistant", "content": f"answer {turn}"}, {"role": "user", "content": "more"}]
            response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": history},
                                       headers={"Authorization": f"Bearer {MASTER_KEY}"})
            served.add(response.headers["x-kimi-pool-account"])
        assert len(served) == 1


async def test_two_client_keys_sharing_a_saturated_pool_are_served_in_turn(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = MoonshotEmulatorConfig.simple(keys=1, concurrency=1)
    async with run_stack(tmp_path, emulator=config, account_extra={"concurrency": 1}) as stack:
        keys = {}
        for name in ("batch", "chat"):
            assert await asyncio.to_thread(run, ["--db", stack.db_url, "keys", "create", name]) == 0
            found = re.search(r"kp-[A-Za-z0-9_-]{20,}", capsys.readouterr().out)
            assert found is not None
            keys[name] = found.group(0)
        await reload(stack)
        stack.emulator.script(None, [{"kind": "hold_after", "chunks": 0}] * 10)
        order: list[str] = []

        async def ask(name: str) -> None:
            await stack.client(keys[name]).chat.completions.create(model=MODEL, messages=HELLO)
            order.append(name)

        tasks = [asyncio.create_task(ask("batch")) for _ in range(7)]
        await stack.gateway.admission.wait_depth(6)  # one upstream, six waiting
        tasks += [asyncio.create_task(ask("chat")) for _ in range(3)]
        await stack.gateway.admission.wait_depth(9)
        await drain(stack, tasks, rounds=10, per_round=1)  # type: ignore[arg-type]
        assert order[:7].count("chat") == 3, order
        assert stack.emulator.snapshot()["totals"]["by_status"] == {"200": 10}


async def test_pool_status_and_rate_limit_headers_report_the_pools_state(tmp_path: Path) -> None:
    config = MoonshotEmulatorConfig.simple(keys=2)
    async with run_stack(tmp_path, emulator=config, account_extra={"rpm": 5}) as stack, stack.http() as http:
        auth = {"Authorization": f"Bearer {MASTER_KEY}"}
        first = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO}, headers=auth)
        assert first.headers["x-ratelimit-limit-requests"] == "10"
        stack.gateway.pool.report(stack.gateway.pool.accounts["acct-2"], RateLimited("slow down", retry_after=9))
        status = (await http.get("/v1/pool/status", headers=auth)).json()
        by_name = {a["name"]: a for a in status["accounts"]}
        assert by_name["acct-1"]["rpm_used"] + by_name["acct-2"]["rpm_used"] == 1
        assert by_name["acct-2"]["state"] == "cooling_down" and by_name["acct-2"]["until"] == stack.clock.time() + 9
        assert status["queue"]["depth"] == 0 and status["next_free_in"][MODEL] == 0
        assert (await http.get("/v1/pool/status")).status_code == 401


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
async def test_a_bad_max_wait_header_is_a_400(tmp_path: Path, value: str) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                                   headers={"Authorization": f"Bearer {MASTER_KEY}", "X-Kimi-Pool-Max-Wait": value})
    assert response.status_code == 400 and response.json()["error"]["param"] == "X-Kimi-Pool-Max-Wait"


async def test_a_cooling_account_is_shown_by_accounts_list_with_its_end(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 40}])
        for _ in range(2):
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert stack.gateway.pool.accounts["acct-1"].state is State.COOLING_DOWN
        await stack.app.state.writer.flush()
        capsys.readouterr()
        assert await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "list", "--json"]) == 0
        listed = {a["name"]: a for a in json.loads(capsys.readouterr().out)}
        assert listed["acct-1"]["state"] == "cooling_down"


async def test_a_client_that_gives_up_while_queued_leaves_at_once_and_costs_no_upstream_call(
        tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"], account_extra={"concurrency": 1}) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "hold_after", "chunks": 0}])
        first = asyncio.create_task(stack.client().chat.completions.create(model=MODEL, messages=HELLO))
        await stack.emulator.wait_for(lambda e: e.held == 1)
        queued = asyncio.create_task(stack.client().chat.completions.create(model=MODEL, messages=HELLO))
        await stack.gateway.admission.wait_depth(1)

        queued.cancel()  # the user pressed stop (or the batch client timed out): the connection closes
        await asyncio.wait_for(stack.gateway.admission.wait_depth(0), 10)  # it left without waiting for the account
        stack.emulator.release()
        assert (await first).choices[0].message.content
        assert stack.emulator.snapshot()["totals"]["requests"] == 1, "the abandoned request was never sent"
        async with stack.http() as http:
            metrics = (await http.get("/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"})).text
        assert re.search(r'kimi_pool_requests_total\{[^}]*outcome="client_closed"[^}]*\} 1\.0', metrics)
