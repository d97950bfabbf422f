"""Failover before the first byte, and what the pool learns from each upstream answer."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.pool.account import State
from app.store.db import Database
from app.store.repository import AccountRepository
from tests.conftest import reload, run_stack, serve
from tests.test_sync import cli

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]


async def test_dead_key_is_tried_once_then_never_again(tmp_path: Path) -> None:
    keys = ["sk-emu-0001", "sk-emu-0002", "sk-revoked-key-000000000"]  # the last one the upstream never issued
    async with run_stack(tmp_path, keys=keys) as stack:
        client = stack.client()
        for i in range(9):
            completion = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=i % 2 == 0)
            if i % 2 == 0:
                async for _ in completion:  # type: ignore[union-attr]
                    pass
        seen = stack.emulator.snapshot()
        assert seen["totals"]["by_status"] == {"200": 9, "401": 1}, "the dead key was tried exactly once"
        assert stack.gateway.pool.accounts["acct-3"].state is State.AUTH_DEAD


async def test_rate_limited_account_cools_down_and_the_client_still_succeeds(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 30}])
        client = stack.client()
        for _ in range(6):
            completion = await client.chat.completions.create(model=MODEL, messages=HELLO)
            assert completion.choices[0].message.content
        account = stack.gateway.pool.accounts["acct-1"]
        assert account.state is State.COOLING_DOWN and account.until == stack.clock.time() + 30
        assert stack.emulator.snapshot()["keys"]["sk-emu-0001"]["requests"] == 1
        stack.clock.advance(30)
        for _ in range(3):
            await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert stack.emulator.snapshot()["keys"]["sk-emu-0001"]["requests"] == 2


async def test_overload_moves_on_without_blaming_the_account(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "overloaded"}])
        completion = await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert completion.choices[0].message.content
        assert stack.gateway.pool.accounts["acct-1"].state is State.ACTIVE


async def test_quota_exhausted_account_is_taken_out(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "quota"}])
        for _ in range(4):
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert stack.gateway.pool.accounts["acct-1"].state is State.QUOTA_EXHAUSTED
        assert stack.emulator.snapshot()["keys"]["sk-emu-0001"]["requests"] == 1


async def test_truncated_stream_before_the_first_byte_fails_over(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "drop_after", "chunks": 0}])
        stack.emulator.script("sk-emu-0002", [{"kind": "html_504"}])
        stream = await stack.client().chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        chunks = [c async for c in stream]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert stack.emulator.snapshot()["totals"]["requests"] == 3


async def test_account_state_survives_a_restart(tmp_path: Path) -> None:
    keys = ["sk-emu-0001", "sk-unknown-key-00000000000"]
    async with run_stack(tmp_path, keys=keys) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 45}])
        for _ in range(2):
            with contextlib.suppress(openai.APIError):
                await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        cooling_until = stack.gateway.pool.accounts["acct-1"].until
        clock = stack.clock
    async with run_stack(tmp_path, keys=keys, clock=clock) as again:
        accounts = again.gateway.pool.accounts
        assert accounts["acct-1"].state is State.COOLING_DOWN and accounts["acct-1"].until == cooling_until
        assert accounts["acct-2"].state is State.AUTH_DEAD
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db")
    async with db.session() as session:
        row = await AccountRepository(session).get("acct-2")
        assert row.state == "auth_dead" and "key" in (row.state_reason or "").lower()
    await db.dispose()


async def test_an_answer_the_adapter_cannot_read_fails_over_and_costs_the_account_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A peer that answers what no Moonshot server would (``choices: [5]``) makes the adapter fail in a way
    nobody classified: the attempt is logged with its traceback, the request moves on, and the account's
    up-front charge is given back in full."""

    async def broken(request: Request) -> Response:
        body = await request.json()
        chunk = b'data: {"id": "x", "object": "chat.completion.chunk", "choices": [5]}\n\n'
        if body.get("stream"):
            return Response(chunk + b"data: [DONE]\n\n", media_type="text/event-stream")
        return Response(b'{"id": "x", "choices": [5]}', media_type="application/json")

    peer = Starlette(routes=[Route("/v1/chat/completions", broken, methods=["POST"])])
    async with serve(peer) as peer_url, run_stack(tmp_path, keys=["sk-emu-0001"]) as stack:
        toml = (f'[[accounts]]\nname = "broken"\nkind = "moonshot"\napi_key = "sk-x"\nbase_url = "{peer_url}/v1"\n'
                f'tpm = 100000\n')
        assert await cli(stack.db_url, "accounts", "import", _write(tmp_path / "b.toml", toml)) == 0
        await reload(stack)
        client = stack.client()
        for i in range(6):  # the ring passes the broken account three times
            if i % 2:
                chunks = [c async for c in await client.chat.completions.create(model=MODEL, messages=HELLO,
                                                                                 stream=True)]
                assert chunks[-1].choices[0].finish_reason == "stop"
            else:
                answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
                assert answer.choices[0].message.content
        broken_account = stack.gateway.pool.accounts["broken"]
        window = broken_account.limits.snapshot(stack.clock.time(), broken_account.in_flight)
        assert window["tpm_used"] == 0 and broken_account.in_flight == 0
        assert broken_account.state is State.ACTIVE, "not the account's fault"
        assert stack.emulator.snapshot()["totals"]["requests"] == 6
        assert any("adapter failed on account broken" in r.getMessage() and r.exc_info for r in caplog.records)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


async def test_an_agent_conversation_stays_on_its_account_and_moves_when_it_dies(tmp_path: Path) -> None:
    """Prompt-cache affinity: ten turns of a tool loop, each resending the growing history, go to the account
    that served the first (its cache holds the prefix: cached tokens grow) while the others are free and serve
    other clients; when that account dies, the conversation moves once and stays on its new account."""
    tools = [{"type": "function", "function": {"name": "run", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}]
    async with run_stack(tmp_path) as stack:
        client = stack.client()
        messages: list[dict[str, object]] = [{"role": "system", "content": "You are a coding agent. " * 40},
                                             {"role": "user", "content": "fix the build"}]
        served, cached = [], []
        for turn in range(10):
            raw = await client.chat.completions.with_raw_response.create(
                model="kimi-k2.6", messages=messages, tools=tools, extra_body={"prompt_cache_key": "agent-7"})
            answer = raw.parse()
            served.append(raw.headers["x-kimi-pool-account"])
            assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
            cached.append(answer.usage.prompt_tokens_details.cached_tokens or 0)
            message = answer.choices[0].message
            turn_out: dict[str, object] = {"role": "assistant", "content": message.content,
                                           "reasoning_content": getattr(message, "reasoning_content", None)}
            if message.tool_calls:
                turn_out["tool_calls"] = [t.model_dump() for t in message.tool_calls]
                messages += [turn_out, {"role": "tool", "tool_call_id": message.tool_calls[0].id,
                                        "content": f"output of step {turn}"}]
            else:
                messages += [turn_out, {"role": "user", "content": f"now step {turn}"}]
            other = await client.chat.completions.with_raw_response.create(model="kimi-k2.6", messages=HELLO)
            served_other = other.headers["x-kimi-pool-account"]
            assert served_other  # other clients still go round the ring
        home = served[0]
        assert served == [home] * 10, "every turn on the account that holds the conversation"
        assert cached[0] == 0 and all(b > a for a, b in itertools.pairwise(cached[1:])), cached
        # the account dies: the next turn moves, keeps working, and the conversation stays where it moved
        key = stack.gateway.pool.accounts[home].secret
        stack.emulator.script(key, [{"kind": "auth"}])
        moved = await client.chat.completions.with_raw_response.create(
            model="kimi-k2.6", messages=messages, tools=tools, extra_body={"prompt_cache_key": "agent-7"})
        new_home = moved.headers["x-kimi-pool-account"]
        assert new_home != home and moved.parse().choices[0].message
        assert stack.gateway.pool.accounts[home].state is State.AUTH_DEAD
        again = await client.chat.completions.with_raw_response.create(
            model="kimi-k2.6", messages=messages, tools=tools, extra_body={"prompt_cache_key": "agent-7"})
        assert again.headers["x-kimi-pool-account"] == new_home
