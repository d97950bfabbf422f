"""``GET /v1/models`` in Anthropic's shape for the SDK, and Claude model names: refused with the command that maps
them, served once an alias does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anthropic
import openai
import pytest

from app.cli import run
from tests.conftest import MASTER_KEY, reload, run_stack


async def test_the_sdk_lists_and_retrieves_models_in_anthropics_shape(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        served = sorted(stack.gateway.pool.models())
        async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=MASTER_KEY, max_retries=0) as client:
            listed = [model async for model in client.models.list(limit=2)]  # the SDK follows the pages
            one = await client.models.retrieve(served[0])
            page = await client.models.list(limit=2)
            with pytest.raises(anthropic.NotFoundError) as missing:
                await client.models.retrieve("claude-opus-4-8")
        assert [model.id for model in listed] == served
        assert all(model.type == "model" and model.display_name == model.id for model in listed)
        assert one.id == served[0] and one.created_at.tzinfo is not None
        assert page.has_more and page.first_id == served[0] and page.last_id == served[1]
        assert "kimi-pool models alias claude-opus-4-8 --moonshot" in missing.value.message
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        openai_list = await stack.client().models.list()  # without anthropic-version: OpenAI's shape
        assert sorted(model.id for model in openai_list.data) == served


async def test_a_claude_name_is_served_once_the_404s_command_maps_it(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=MASTER_KEY, max_retries=0) as client:
            with pytest.raises(anthropic.NotFoundError) as refused:
                await client.messages.create(model="claude-opus-4-8", max_tokens=64,
                                             messages=[{"role": "user", "content": "hi"}])
            command = refused.value.message.split("Map it with: ", 1)[1].split(" (", 1)[0]
            assert command == "kimi-pool models alias claude-opus-4-8 --moonshot kimi-k2.6"
            assert stack.emulator.snapshot()["totals"]["requests"] == 0
            words = command.split()[1:]
            assert await asyncio.to_thread(run, ["--db", stack.db_url, *words]) == 0
            await reload(stack)
            message = await client.messages.create(model="claude-opus-4-8", max_tokens=64,
                                                   messages=[{"role": "user", "content": "hi"}])
        assert message.model == "claude-opus-4-8" and message.content
        assert stack.emulator.recent_requests("sk-emu-0001")[-1]["model"] == "kimi-k2.6"
        with_openai = await stack.client().chat.completions.create(
            model="claude-opus-4-8", messages=[{"role": "user", "content": "hi"}])
        assert with_openai.choices[0].message.content


async def test_an_unknown_non_claude_model_names_what_is_served(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=MASTER_KEY, max_retries=0) as client:
            with pytest.raises(anthropic.NotFoundError) as refused:
                await client.messages.create(model="gpt-9", max_tokens=64, messages=[{"role": "user", "content": "x"}])
        assert "kimi-k2.5" in refused.value.message and "alias" not in refused.value.message
        with pytest.raises(openai.NotFoundError):  # the OpenAI front-end keeps its own shape
            await stack.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
