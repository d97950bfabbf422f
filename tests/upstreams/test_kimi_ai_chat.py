"""kimi-ai-chat accounts through the gateway: the nonce manager, flattening, failover, word streaming.

Real servers on 127.0.0.1: one kimi-ai.chat emulator per account (an account is an egress
identity), kimi-pool under uvicorn, the openai SDK as the client; time on a manual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest

from app.clock import ManualClock
from app.emulator.kimi_ai_chat import KimiAiChatEmulator, KimiAiChatEmulatorConfig, create_kimi_ai_chat_emulator
from app.probe import probe_accounts
from app.store.db import Database
from app.upstreams.registry import Registry
from tests.conftest import Gateway, run_gateway, serve

MODEL = "kimi-k2-instruct-0905"
SITE_MODEL = "moonshotai/Kimi-K2-Instruct-0905"
HELLO = [{"role": "user", "content": "Hello"}]


@dataclass
class Site:
    url: str
    emulator: KimiAiChatEmulator


@dataclass
class ChatStack:
    gateway: Gateway
    sites: list[Site]
    clock: ManualClock

    def client(self) -> openai.AsyncOpenAI:
        return self.gateway.client()

    def state(self, name: str) -> tuple[str, str | None]:
        account = self.gateway.gateway.pool.accounts[name]
        return account.state.value, account.reason


@contextlib.asynccontextmanager
async def chat_stack(tmp_path: Path, sites: int = 1, *, extra: str = "",
                     config: KimiAiChatEmulatorConfig | None = None) -> AsyncIterator[ChatStack]:
    clock = ManualClock()
    async with contextlib.AsyncExitStack() as stack:
        running = []
        for _ in range(sites):
            app = create_kimi_ai_chat_emulator(config or KimiAiChatEmulatorConfig(), clock=clock)
            url = await stack.enter_async_context(serve(app))
            running.append(Site(url, app.state.emulator))
        toml = "".join(f'[[accounts]]\nname = "site-{i}"\nkind = "kimi-ai-chat"\nbase_url = "{s.url}"\n{extra}\n'
                       for i, s in enumerate(running, start=1))
        gateway = await stack.enter_async_context(run_gateway(tmp_path, toml, clock=clock))
        yield ChatStack(gateway, running, clock)


async def test_fifty_concurrent_requests_on_one_account_fetch_the_nonce_once(tmp_path: Path) -> None:
    async with chat_stack(tmp_path) as stack:
        client = stack.client()
        answers = await asyncio.gather(*(
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"question {i}"}])
            for i in range(50)))
        site = stack.sites[0].emulator.stats
        assert site.page_fetches == 1 and site.ajax_requests == 50 and site.ok == 50
        assert answers[7].choices[0].message.content.startswith("Reply to: question 7 — Hello from the")
        assert site.last_model == SITE_MODEL


@pytest.mark.parametrize("mode", ["wpcore", "wpcore_legacy", "plugin_json"])
async def test_a_rotated_nonce_is_refreshed_once_and_the_request_succeeds(tmp_path: Path, mode: str) -> None:
    async with chat_stack(tmp_path, config=KimiAiChatEmulatorConfig(bad_nonce_mode=mode)) as stack:
        client = stack.client()
        await client.chat.completions.create(model=MODEL, messages=HELLO)
        site = stack.sites[0].emulator
        site.rotate_nonce()
        site.rotate_nonce()  # the cached nonce is now two rotations old: rejected
        answers = await asyncio.gather(*(client.chat.completions.create(model=MODEL, messages=HELLO)
                                         for _ in range(5)))
        assert all(a.choices[0].message.content for a in answers)
        assert site.stats.page_fetches == 2, "five rejections, one refresh"
        assert site.stats.bad_nonce == 5 and site.stats.ok == 6
        assert stack.state("site-1") == ("active", None)


async def test_a_fresh_nonce_rejected_again_takes_the_account_out_and_another_serves(tmp_path: Path) -> None:
    async with chat_stack(tmp_path, sites=2) as stack:
        first, second = (s.emulator for s in stack.sites)
        first.script(None, [{"kind": "bad_nonce"}, {"kind": "bad_nonce"}])
        client = stack.client()
        for _ in range(2):  # one of them goes to site-1, is rejected twice, and moves to site-2
            answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
            assert answer.choices[0].message.content.startswith("Reply to: Hello")
        state, reason = stack.state("site-1")
        assert state == "auth_dead" and "rejected a freshly fetched nonce" in (reason or "")
        assert first.stats.page_fetches == 2 and second.stats.ok == 2


async def test_a_challenge_page_fails_over_and_cools_the_account(tmp_path: Path) -> None:
    async with chat_stack(tmp_path, sites=2) as stack:
        first, second = (s.emulator for s in stack.sites)
        first.configure({"page_mode": "challenge_403"})
        client = stack.client()
        for _ in range(3):
            answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
            assert answer.choices[0].message.content.startswith("Reply to: Hello")
        assert first.stats.ajax_requests == 0 and second.stats.ok == 3
        state, reason = stack.state("site-1")
        assert state == "cooling_down" and "challenge page" in (reason or "")


async def test_an_html_page_instead_of_json_fails_over(tmp_path: Path) -> None:
    async with chat_stack(tmp_path, sites=2) as stack:
        first, second = (s.emulator for s in stack.sites)
        first.script(None, [{"kind": "html_200"}])
        for _ in range(2):  # one of them meets the HTML page on site-1 and moves to site-2
            answer = await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
            assert answer.choices[0].message.content.startswith("Reply to: Hello")
        assert (first.stats.ok, second.stats.ok) == (0, 2)
        assert stack.state("site-1")[0] == "cooling_down"


@pytest.mark.parametrize("fault", [{"kind": "http_error", "status": 502}, {"kind": "reset"}, {"kind": "truncate"}])
async def test_a_broken_answer_fails_over_never_becomes_text(tmp_path: Path, fault: dict[str, object]) -> None:
    async with chat_stack(tmp_path, sites=2) as stack:
        first, second = (s.emulator for s in stack.sites)
        first.script(None, [fault])
        for _ in range(2):  # one of them meets the fault on site-1 and moves to site-2
            answer = await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
            assert answer.choices[0].message.content.startswith("Reply to: Hello")
        assert first.stats.ajax_requests + second.stats.ajax_requests == 3, "two answers, one broken one"
        assert first.stats.ok + second.stats.ok == 2 and second.stats.ok >= 1
        assert stack.state("site-1") == ("active", None), "a broken answer is not the account's fault"


async def test_when_every_account_fails_the_client_gets_an_error(tmp_path: Path) -> None:
    async with chat_stack(tmp_path) as stack:
        stack.sites[0].emulator.script(None, [{"kind": "http_error", "status": 502}])
        with pytest.raises(openai.APIStatusError) as caught:
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert caught.value.status_code == 503 and "HTTP 502" in caught.value.message


async def test_a_stream_is_relayed_in_word_sized_chunks(tmp_path: Path) -> None:
    async with chat_stack(tmp_path) as stack:
        stream = await stack.client().chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices
                  and chunk.choices[0].delta.content]
        text = "".join(pieces)
        assert text.startswith("Reply to: Hello — Hello from the kimi-ai.chat emulator,")
        assert len(pieces) == len(text.split()) and all(len(p.split()) == 1 for p in pieces)


async def test_a_conversation_is_flattened_oldest_turns_dropped_first(tmp_path: Path) -> None:
    async with chat_stack(tmp_path, extra="max_message_chars = 80\n") as stack:
        messages = [{"role": "system", "content": "Be brief."}]
        for i in range(5):
            messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        messages.append({"role": "user", "content": "and now?"})
        await stack.client().chat.completions.create(model="kimi-k2", messages=messages)
        sent = stack.sites[0].emulator.stats.last_message or ""
        assert len(sent) <= 80
        assert sent.startswith("System: Be brief.\n\n") and sent.endswith("Assistant: answer 4\n\nUser: and now?")
        assert "question 0" not in sent


async def test_a_message_longer_than_every_account_takes_is_a_clear_400(tmp_path: Path) -> None:
    async with chat_stack(tmp_path) as stack:
        with pytest.raises(openai.BadRequestError) as caught:
            await stack.client().chat.completions.create(model=MODEL,
                                                         messages=[{"role": "user", "content": "x" * 1500}])
        assert "1500 characters" in caught.value.message and caught.value.code == "context_length_exceeded"
        assert stack.sites[0].emulator.stats.ajax_requests == 0


async def test_a_site_that_truncates_less_than_we_do_refuses_with_a_clear_error(tmp_path: Path) -> None:
    config = KimiAiChatEmulatorConfig(max_message_chars=100, message_policy="reject")
    async with chat_stack(tmp_path, config=config) as stack:
        with pytest.raises(openai.BadRequestError) as caught:
            await stack.client().chat.completions.create(model=MODEL,
                                                         messages=[{"role": "user", "content": "y" * 500}])
        assert "too long" in caught.value.message
        site = stack.sites[0].emulator.stats
        assert site.page_fetches == 1 and site.bad_nonce == 0, "not mistaken for a stale nonce"
        assert stack.state("site-1") == ("active", None)


async def test_accounts_check_fetches_each_sites_page_afresh(tmp_path: Path) -> None:
    async with chat_stack(tmp_path, sites=2) as stack:
        stack.sites[1].emulator.configure({"page_mode": "challenge_503"})
        db = Database(stack.gateway.db_url)
        async with aiohttp.ClientSession() as session:
            registry = Registry.default(session, stack.clock)
            results = {r.name: r for r in await probe_accounts(db, registry, stack.clock, None)}
            await registry.close()
        await db.dispose()
        assert (results["site-1"].after, results["site-1"].outcome) == ("active", "ok")
        assert results["site-2"].after == "cooling_down" and "challenge page" in results["site-2"].detail
        assert [s.emulator.stats.page_fetches for s in stack.sites] == [1, 1]
