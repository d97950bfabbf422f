"""kimi-web accounts through the gateway: Connect streaming, conversation continuity, failover.

Real servers on 127.0.0.1: the kimi.com emulator (one user per account), kimi-pool under uvicorn,
the openai SDK as the client; time on a manual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from app.clock import ManualClock
from app.emulator.kimi_web import KimiWebEmulator, KimiWebEmulatorConfig, create_kimi_web_emulator, mint_jwt
from app.probe import probe_accounts
from app.store.db import Database
from app.upstreams.registry import Registry
from tests.conftest import MASTER_KEY, Gateway, reload, run_gateway, serve
from tests.test_sync import cli

MODEL = "kimi-k2.5"
HELLO = [{"role": "user", "content": "Hello"}]


@dataclass
class WebStack:
    gateway: Gateway
    emulator: KimiWebEmulator
    url: str
    clock: ManualClock
    tokens: list[str]

    def client(self) -> openai.AsyncOpenAI:
        return self.gateway.client()

    def state(self, name: str) -> tuple[str, str | None]:
        account = self.gateway.gateway.pool.accounts[name]
        return account.state.value, account.reason

    def user_requests(self, index: int) -> int:
        return self.emulator.stats.users[self.emulator.config.users[index]].chat_requests

    def chats(self) -> list[Any]:
        return list(self.emulator.chats.values())


@contextlib.asynccontextmanager
async def web_stack(tmp_path: Path, users: int = 1, *, config: dict[str, Any] | None = None,
                    ttl: list[float] | None = None, extra: str = "") -> AsyncIterator[WebStack]:
    clock = ManualClock()
    app = create_kimi_web_emulator(KimiWebEmulatorConfig.simple(users, **(config or {})), clock=clock)
    emulator: KimiWebEmulator = app.state.emulator
    async with serve(app) as url:
        tokens = [mint_jwt(user, now=clock.time(), ttl=(ttl or [30 * 86400.0] * users)[i])
                  for i, user in enumerate(emulator.config.users)]
        toml = "".join(f'[[accounts]]\nname = "web-{i}"\nkind = "kimi-web"\ntoken = "{token}"\nbase_url = "{url}"\n'
                       f'{extra}\n' for i, token in enumerate(tokens, start=1))
        async with run_gateway(tmp_path, toml, clock=clock) as gateway:
            yield WebStack(gateway, emulator, url, clock, tokens)


async def collect(stream: Any) -> tuple[str, str, list[str]]:
    """(content, reasoning, content pieces) of an SDK stream."""
    content, reasoning, pieces = [], [], []
    async for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            content.append(delta.content)
            pieces.append(delta.content)
        extra = (delta.model_extra or {}).get("reasoning_content")
        if extra:
            reasoning.append(extra)
    return "".join(content), "".join(reasoning), pieces


# --- streaming --------------------------------------------------------------------------------------


async def test_a_stream_is_relayed_chunk_by_chunk_with_its_reasoning(tmp_path: Path) -> None:
    async with web_stack(tmp_path) as stack:
        stack.emulator.script(None, [{"kind": "hold_after", "chunks": 3}])
        stream = await stack.client().chat.completions.create(model="kimi-k2.5-thinking", messages=HELLO, stream=True)
        early: list[str] = []
        reasoning: list[str] = []
        async for chunk in stream:  # these arrive while the emulator holds the rest of the answer
            delta = chunk.choices[0].delta
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            if delta.content:
                early.append(delta.content)
            if len(early) == 3:
                break
        assert stack.emulator.held == 1, "the first chunks reached the client before the answer was complete"
        assert "".join(reasoning).strip(), "thinking is relayed as reasoning_content"
        stack.emulator.release()
        content, _, pieces = await collect(stream)
        text = "".join(early) + content
        assert text.startswith("Turn 1 of chat:") and len(early + pieces) == 13
        [chat] = stack.chats()
        assert chat.messages[-1].content == text


async def test_a_whole_answer_and_its_reasoning_without_streaming(tmp_path: Path) -> None:
    async with web_stack(tmp_path) as stack:
        answer = await stack.client().chat.completions.create(model="kimi-k2.6-thinking", messages=HELLO)
        message = answer.choices[0].message
        assert message.content.startswith("Turn 1 of chat:") and answer.choices[0].finish_reason == "stop"
        assert (message.model_extra or {}).get("reasoning_content")
        [chat] = stack.chats()
        assert chat.messages[0].scenario == "SCENARIO_K2D6" and chat.messages[0].content == "Hello"
        assert answer.usage is not None and answer.usage.completion_tokens > 0


async def test_a_stream_cut_before_its_end_frame_is_an_error_after_the_first_byte(tmp_path: Path) -> None:
    async with web_stack(tmp_path) as stack:
        stack.emulator.script(None, [{"kind": "drop_after", "chunks": 3}])
        stream = await stack.client().chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        with pytest.raises(openai.APIError) as caught:
            await collect(stream)
        assert "cut before its end-of-stream frame" in caught.value.message


@pytest.mark.parametrize("fault", [{"kind": "drop_after", "chunks": 0}, {"kind": "http_error", "status": 503},
                                   {"kind": "error_frame_after", "chunks": 0, "code": "internal"}])
async def test_a_failure_before_the_first_byte_fails_over(tmp_path: Path, fault: dict[str, Any]) -> None:
    async with web_stack(tmp_path, users=2) as stack:
        stack.emulator.script(stack.tokens[0], [fault])
        for _ in range(2):  # one of them meets the fault on web-1 and moves to web-2
            stream = await stack.client().chat.completions.create(model=MODEL, messages=HELLO, stream=True)
            content, _, _ = await collect(stream)
            assert content.startswith("Turn 1 of chat:")
        assert stack.user_requests(0) + stack.user_requests(1) == 3
        assert stack.emulator.stats.completed_streams == 2


async def test_done_without_the_end_of_stream_frame_is_truncated(tmp_path: Path) -> None:
    async with web_stack(tmp_path) as stack:
        stack.emulator.script(None, [{"kind": "drop_before_end"}])
        with pytest.raises(openai.APIStatusError) as caught:
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert caught.value.status_code == 503 and "end-of-stream" in caught.value.message


# --- accounts leaving -------------------------------------------------------------------------------


async def test_an_expired_token_takes_its_account_out_and_another_serves(tmp_path: Path) -> None:
    async with web_stack(tmp_path, users=2, ttl=[600.0, 30 * 86400.0]) as stack:
        stack.clock.advance(3600)
        for _ in range(2):
            answer = await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
            assert answer.choices[0].message.content.startswith("Turn 1 of chat:")
        state, reason = stack.state("web-1")
        assert state == "auth_dead" and "expired" in (reason or "")
        assert stack.user_requests(0) == 0, "known to be expired: not even sent"


@pytest.mark.parametrize("mode", ["stream", "http"])
async def test_a_revoked_login_takes_its_account_out(tmp_path: Path, mode: str) -> None:
    async with web_stack(tmp_path, users=2, config={"auth_error_mode": mode}) as stack:
        stack.clock.advance(1)  # a logout revokes the tokens issued before it
        stack.emulator.revoke(stack.emulator.config.users[0])
        for _ in range(2):
            answer = await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
            assert answer.choices[0].message.content.startswith("Turn 1 of chat:")
        state, reason = stack.state("web-1")
        assert state == "auth_dead" and "unauthenticated" in (reason or "")


@pytest.mark.parametrize("mode", ["stream", "http", "status"])
async def test_an_exhausted_login_cools_down_and_another_serves(tmp_path: Path, mode: str) -> None:
    async with web_stack(tmp_path, users=2) as stack:
        stack.emulator.script(stack.tokens[0], [{"kind": "resource_exhausted", "mode": mode}])
        client = stack.client()
        for _ in range(2):  # one of them finds web-1 exhausted and moves to web-2
            answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
            assert answer.choices[0].message.content.startswith("Turn 1 of chat:")
        state, reason = stack.state("web-1")
        assert state == "cooling_down" and "usage limit" in (reason or "")


async def test_when_every_login_is_exhausted_the_client_gets_429_not_text(tmp_path: Path) -> None:
    async with web_stack(tmp_path, config={"quota_turns": 1, "quota_mode": "status"}) as stack:
        await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        with pytest.raises(openai.RateLimitError) as caught:
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert "usage limit" in caught.value.message and caught.value.response.headers["retry-after"]


async def test_one_live_stream_per_account_the_second_request_waits(tmp_path: Path) -> None:
    async with web_stack(tmp_path) as stack:
        stack.emulator.script(None, [{"kind": "hold_after", "chunks": 1}])
        client = stack.client()
        first = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO))
        await stack.emulator.wait_for(lambda e: e.held == 1)
        second = asyncio.create_task(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Another"}]))
        await stack.gateway.gateway.admission.wait_depth(1)
        stack.emulator.release()
        answers = await asyncio.gather(first, second)
        assert all(a.choices[0].message.content for a in answers)
        assert stack.emulator.stats.peak_in_flight == 1 and "aborted" not in stack.emulator.stats.by_code


# --- conversations ----------------------------------------------------------------------------------


async def converse(client: openai.AsyncOpenAI, turns: int, **kw: Any) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i + 1}"})
        answer = await client.chat.completions.create(model=MODEL, messages=messages, **kw)  # type: ignore[arg-type]
        messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
    return messages


async def test_a_conversation_with_a_session_id_continues_one_upstream_chat(tmp_path: Path) -> None:
    async with web_stack(tmp_path) as stack:
        messages = await converse(stack.client(), 3, extra_headers={"X-Session-Id": "conv-1"})
        assert messages[-1]["content"].startswith("Turn 3 of chat:")
        [chat] = stack.chats()
        sent = [m.content for m in chat.messages if m.role == "user"]
        assert sent == ["question 1", "question 2", "question 3"], "later turns send only what is new"
        assert stack.emulator.stats.chats_deleted == 0


async def test_a_chat_ui_conversation_without_an_id_reuses_one_chat_after_its_first_turn(tmp_path: Path) -> None:
    async with web_stack(tmp_path) as stack:
        messages = await converse(stack.client(), 3)
        await stack.emulator.wait_for(lambda e: e.stats.chats_deleted == 1)  # the lone first turn was one-off
        [chat] = stack.chats()
        sent = [m.content for m in chat.messages if m.role == "user"]
        assert sent[0] == f"User: question 1\n\nAssistant: {messages[1]['content']}\n\nUser: question 2"
        assert sent[1] == "question 3"
        assert messages[-1]["content"].startswith("Turn 2 of chat:")


async def test_one_off_chats_are_deleted_unless_kept(tmp_path: Path) -> None:
    async with web_stack(tmp_path) as stack:
        await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        await stack.emulator.wait_for(lambda e: e.stats.chats_deleted == 1)
        assert stack.chats() == []
    (tmp_path / "kept").mkdir()
    async with web_stack(tmp_path / "kept", extra="keep_chats = true\n") as stack:
        await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert len(stack.chats()) == 1 and stack.emulator.stats.delete_calls == 0


async def test_a_migrated_session_replays_its_transcript_into_a_new_chat(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    async with web_stack(tmp_path / "a", users=2) as stack:
        client = stack.client()
        headers = {"X-Session-Id": "moving"}
        messages = await converse(client, 2, extra_headers=headers)
        sessions = stack.gateway.gateway.sessions
        [holder] = sessions.for_account("web-1") + sessions.for_account("web-2")
        other = "web-2" if holder.account == "web-1" else "web-1"
        assert await cli(stack.gateway.db_url, "accounts", "disable", holder.account) == 0
        await reload(stack.gateway)
        messages.append({"role": "user", "content": "question 3"})
        answer = await client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                      extra_headers=headers)
        assert answer.choices[0].message.content.startswith("Turn 1 of chat:"), "a new chat on the new account"
        assert holder.account == other
        new_chat = next(c for c in stack.chats() if len(c.messages) == 2)
        assert new_chat.messages[0].content.startswith("User: question 1\n\nAssistant: Turn 1 of chat:")
        assert new_chat.messages[0].content.endswith("User: question 3")


# --- the operator's view ------------------------------------------------------------------------------


async def test_a_token_about_to_lapse_is_warned_about_in_the_log(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kimi_pool.sync"):
        async with web_stack(tmp_path, users=2, ttl=[2 * 86400.0, 30 * 86400.0]):
            pass
    warnings = [r.getMessage() for r in caplog.records if r.name == "kimi_pool.sync"]
    assert len(warnings) == 1 and warnings[0].startswith("account web-1: its kimi.com login token expires")
    assert "(in 2d)" in warnings[0] or "(in 1d)" in warnings[0]


async def test_a_replaced_token_is_said_in_the_log_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kimi_pool.sync")
    async with web_stack(tmp_path, ttl=[2 * 86400.0]) as stack:
        fresh = mint_jwt(stack.emulator.config.users[0], now=stack.clock.time(), ttl=30 * 86400.0)
        async with httpx.AsyncClient(base_url=stack.gateway.url,
                                     headers={"Authorization": f"Bearer {MASTER_KEY}"}) as admin:
            assert (await admin.patch("/admin/accounts/web-1", json={"token": fresh})).status_code == 200
        await reload(stack.gateway)
    said = [r.getMessage() for r in caplog.records if r.name == "kimi_pool.sync" and "token" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("account web-1: its kimi.com login token expires")
    assert said[1].startswith("account web-1: its kimi.com login token was replaced; the new one expires ")
    assert said[1].endswith("(in 30d)") and fresh not in caplog.text


async def test_accounts_check_asks_kimi_com_whether_each_login_still_works(tmp_path: Path) -> None:
    async with web_stack(tmp_path, users=2) as stack:
        stack.clock.advance(1)
        stack.emulator.revoke(stack.emulator.config.users[1])
        db = Database(stack.gateway.db_url)
        async with aiohttp.ClientSession() as session:
            registry = Registry.default(session, stack.clock)
            results = {r.name: r for r in await probe_accounts(db, registry, stack.clock, None)}
            await registry.close()
        await db.dispose()
        assert (results["web-1"].after, results["web-1"].outcome) == ("active", "ok")
        assert results["web-2"].after == "auth_dead" and "unauthenticated" in results["web-2"].detail
        assert stack.emulator.stats.subscription_calls == 2


async def test_a_chat_deleted_on_kimi_com_is_replaced_by_a_replay(tmp_path: Path) -> None:
    async with web_stack(tmp_path) as stack:
        client = stack.client()
        headers = {"X-Session-Id": "kept-then-deleted"}
        messages = await converse(client, 2, extra_headers=headers)
        [chat] = stack.chats()
        async with aiohttp.ClientSession() as http:  # the user deletes the chat in the browser
            async with http.post(f"{stack.url}/apiv2/kimi.chat.v1.ChatService/DeleteChat", json={"chat_id": chat.id},
                                 headers={"Authorization": f"Bearer {stack.tokens[0]}"}) as response:
                assert response.status == 200
        messages.append({"role": "user", "content": "question 3"})
        answer = await client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                      extra_headers=headers)
        assert answer.choices[0].message.content.startswith("Turn 1 of chat:")
        [new_chat] = stack.chats()
        assert new_chat.id != chat.id and new_chat.messages[0].content.startswith("User: question 1\n\n")
        assert "not_found" in stack.emulator.stats.by_code
        turn_four = [*messages, {"role": "assistant", "content": answer.choices[0].message.content or ""},
                     {"role": "user", "content": "question 4"}]
        answer = await client.chat.completions.create(model=MODEL, messages=turn_four,  # type: ignore[arg-type]
                                                      extra_headers=headers)
        assert answer.choices[0].message.content.startswith("Turn 2 of chat:"), "and the new chat is continued"
