"""Capability routing: a request lands on an account that can do what it asks, or is refused with a 400
that names the parameter — on a pool that mixes all three kinds behind one alias, against their emulators."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from app import capabilities as cap
from app.api.openai.schema import parse_chat_request
from app.clock import ManualClock
from app.emulator.asgi import EmulatorApp
from app.emulator.kimi_ai_chat import KimiAiChatEmulatorConfig, create_kimi_ai_chat_emulator
from app.emulator.kimi_web import KimiWebEmulatorConfig, create_kimi_web_emulator
from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import Gateway, run_gateway, serve

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}
ASK = [{"role": "user", "content": "hello"}]


@dataclass
class Mixed:
    gateway: Gateway
    moonshot: EmulatorApp
    web: EmulatorApp
    chat: EmulatorApp

    def client(self) -> openai.AsyncOpenAI:
        return self.gateway.client()


@contextlib.asynccontextmanager
async def mixed_pool(tmp_path: Path, kinds: tuple[str, ...] = ("moonshot", "kimi-web", "kimi-ai-chat"),
                     moonshot_keys: int = 1) -> AsyncIterator[Mixed]:
    """``m1``… (moonshot), ``w`` (kimi-web) and ``c`` (kimi-ai-chat) accounts on their emulators, all serving
    the built-in alias ``kimi-k2``."""
    clock = ManualClock()
    moonshot = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=moonshot_keys), clock=clock)
    web = create_kimi_web_emulator(KimiWebEmulatorConfig.simple(1), clock=clock)
    chat = create_kimi_ai_chat_emulator(KimiAiChatEmulatorConfig(), clock=clock)
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve(app)) for app in (moonshot, web, chat)]
        toml = ""
        if "moonshot" in kinds:
            for i, key in enumerate(sorted(moonshot.state.emulator.config.keys), start=1):
                toml += (f'[[accounts]]\nname = "m{i}"\nkind = "moonshot"\napi_key = "{key}"\n'
                         f'base_url = "{urls[0]}/v1"\n\n')
        if "kimi-web" in kinds:
            token = web.state.emulator.token(web.state.emulator.config.users[0])
            toml += f'[[accounts]]\nname = "w"\nkind = "kimi-web"\ntoken = "{token}"\nbase_url = "{urls[1]}"\n\n'
        if "kimi-ai-chat" in kinds:
            toml += f'[[accounts]]\nname = "c"\nkind = "kimi-ai-chat"\nbase_url = "{urls[2]}"\n'
        gateway = await stack.enter_async_context(run_gateway(tmp_path, toml, clock=clock))
        yield Mixed(gateway, moonshot, web, chat)


async def served_by(client: openai.AsyncOpenAI, **kw: Any) -> tuple[str, Any]:
    response = await client.chat.completions.with_raw_response.create(model="kimi-k2", **kw)
    return response.headers["x-kimi-pool-account"], response.parse()


async def test_tools_and_json_land_only_on_accounts_that_can_serve_them(tmp_path: Path) -> None:
    async with mixed_pool(tmp_path) as pool:
        client = pool.client()
        plain = [(await served_by(client, messages=ASK))[0] for _ in range(3)]
        assert sorted(plain) == ["c", "m1", "w"], "plain requests still go round the whole ring"
        for _ in range(3):  # wherever the cursor stands, the ring skips the kinds that cannot
            assert (await served_by(client, messages=ASK, tools=TOOLS))[0] == "m1"
            assert (await served_by(client, messages=ASK, response_format=SCHEMA))[0] == "m1"
            assert (await served_by(client, messages=ASK, response_format={"type": "json_object"}))[0] == "m1"
            assert (await served_by(client, messages=ASK, tools=TOOLS, tool_choice="required"))[0] == "m1"
        # streams too, concurrently: kimi-web (one stream at a time) and kimi-ai-chat are never tried
        streams = await asyncio.gather(*(client.chat.completions.with_raw_response.create(
            model="kimi-k2", messages=ASK, tools=TOOLS, stream=True) for _ in range(4)))
        assert {s.headers["x-kimi-pool-account"] for s in streams} == {"m1"}
        for s in streams:
            async for _ in s.parse():
                pass
        # a tool choice of "none" asks nothing of the upstream: any account may serve it
        served = {(await served_by(client, messages=ASK, tools=TOOLS, tool_choice="none"))[0] for _ in range(3)}
        assert served == {"c", "m1", "w"}


async def test_reasoning_effort_turns_thinking_on_and_routes_to_a_thinking_account(tmp_path: Path) -> None:
    async with mixed_pool(tmp_path) as pool:
        client = pool.client()
        # kimi-k2 is the moonshot account's kimi-k2-0905-preview (never thinks) and kimi-web's K2 scenario
        # (thinks when asked): every thinking request goes to kimi-web, with thinking on
        for _ in range(3):
            account, answer = await served_by(client, messages=ASK, reasoning_effort="high")
            assert account == "w"
            assert getattr(answer.choices[0].message, "reasoning_content", None)
        # thinking off can be served by every kind
        served = {(await served_by(client, messages=ASK, reasoning_effort="none"))[0] for _ in range(3)}
        assert served == {"c", "m1", "w"}


async def test_a_need_no_enabled_account_can_serve_is_a_400_naming_it(tmp_path: Path) -> None:
    async with mixed_pool(tmp_path, kinds=("kimi-web", "kimi-ai-chat")) as pool:
        client = pool.client()
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="kimi-k2", messages=ASK, tools=TOOLS)
        error = refused.value.body
        assert isinstance(error, dict)
        assert (error["code"], error["param"]) == ("unsupported_parameter", "tools")
        assert "'kimi-k2'" in error["message"] and "tool calls" in error["message"]
        assert "kimi-ai-chat, kimi-web" in error["message"] and "moonshot" in error["message"]
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="kimi-k2", messages=[{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
        assert refused.value.body["param"] == "messages"  # type: ignore[index]
        assert "image input" in refused.value.body["message"]  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="kimi-k2", messages=ASK, response_format=SCHEMA)
        assert refused.value.body["param"] == "response_format"  # type: ignore[index]
        # nothing reached an upstream, and plain requests still work
        assert pool.web.state.emulator.stats.chat_requests == 0
        assert (await served_by(client, messages=ASK))[1].choices[0].message.content


async def test_failover_and_session_migration_obey_the_needs(tmp_path: Path) -> None:
    async with mixed_pool(tmp_path, moonshot_keys=2) as pool:
        client = pool.client()
        emulator = pool.moonshot.state.emulator
        keys = sorted(emulator.config.keys)
        # a tool request whose moonshot account fails moves to the other moonshot account, never to w or c
        for key in keys:
            emulator.script(key, [{"kind": "server_error"}])
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model="kimi-k2", messages=ASK, tools=TOOLS)
        assert pool.web.state.emulator.stats.chat_requests == 0
        assert pool.chat.state.emulator.stats.ajax_requests == 0
        emulator.script(keys[0], [{"kind": "server_error"}])
        account, _ = await served_by(client, messages=ASK, tools=TOOLS)
        assert account in ("m1", "m2")
        # a conversation held by kimi-web moves to a moonshot account for a turn with tools, and the binding
        # follows it
        session = {"X-Session-Id": "conversation-1"}
        first = await client.chat.completions.with_raw_response.create(
            model="kimi-k2", messages=ASK, reasoning_effort="low", extra_headers=session)
        assert first.headers["x-kimi-pool-account"] == "w"
        history = [*ASK, {"role": "assistant", "content": first.parse().choices[0].message.content},
                   {"role": "user", "content": "and the weather?"}]
        second = await client.chat.completions.with_raw_response.create(
            model="kimi-k2", messages=history, tools=TOOLS, extra_headers=session)
        moved_to = second.headers["x-kimi-pool-account"]
        assert moved_to in ("m1", "m2")
        third = await client.chat.completions.with_raw_response.create(
            model="kimi-k2", messages=[*history, {"role": "assistant", "content": "sunny"},
                                       {"role": "user", "content": "thanks"}], extra_headers=session)
        assert third.headers["x-kimi-pool-account"] == moved_to, "the session stays where it moved"


def test_needs_are_derived_once_from_the_request() -> None:
    def needs(**body: Any) -> frozenset[str]:
        return parse_chat_request({"model": "m", "messages": ASK, **body}).needs

    assert needs() == frozenset()
    assert needs(tools=TOOLS) == {cap.TOOLS}
    assert needs(tools=TOOLS, tool_choice="none") == frozenset()
    assert needs(tools=TOOLS, tool_choice="required") == {cap.TOOLS, cap.FORCED_TOOL}
    assert needs(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 reasoning_effort="low") == {cap.TOOLS, cap.FORCED_TOOL_THINKING, cap.THINKING}
    assert needs(thinking={"type": "disabled"}) == {cap.NO_THINKING}
    assert needs(response_format={"type": "text"}) == frozenset()
    assert needs(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "{", "partial": True}]) \
        == {cap.PARTIAL}


@pytest.mark.parametrize(("kind", "model", "can", "cannot"), [
    ("moonshot", "kimi-k2.6", {cap.TOOLS, cap.THINKING, cap.NO_THINKING, cap.FORCED_TOOL, cap.IMAGES},
     {cap.FORCED_TOOL_THINKING}),
    ("moonshot", "kimi-k3", {cap.THINKING, cap.FORCED_TOOL, cap.FORCED_TOOL_THINKING}, {cap.NO_THINKING}),
    ("moonshot", "kimi-k2.7-code", {cap.THINKING, cap.TOOLS}, {cap.NO_THINKING, cap.FORCED_TOOL}),
    ("moonshot", "kimi-k2-0905-preview", {cap.TOOLS, cap.FORCED_TOOL, cap.NO_THINKING}, {cap.THINKING, cap.IMAGES}),
    ("kimi-web", "kimi-k2.6", {cap.THINKING, cap.NO_THINKING}, {cap.TOOLS, cap.JSON_SCHEMA, cap.IMAGES}),
    ("kimi-web", "kimi-k2.6-thinking", {cap.THINKING}, {cap.NO_THINKING}),
    ("kimi-ai-chat", "kimi-k2-instruct", {cap.NO_THINKING}, {cap.THINKING, cap.TOOLS, cap.JSON_OBJECT}),
])
def test_what_each_kind_and_model_can_do(kind: str, model: str, can: set[str], cannot: set[str]) -> None:
    able = cap.capabilities(kind, model)
    assert can <= able
    assert not cannot & able
