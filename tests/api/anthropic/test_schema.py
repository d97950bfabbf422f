"""What the Messages API's request fields become on the way to Kimi (asserted on what the emulator received),
through the real gateway and the ``anthropic`` SDK."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from tests.conftest import MASTER_KEY, Stack, run_stack

PLAIN = "kimi-k2-0905-preview"
VISION = "kimi-k2.5"
KEY = "sk-emu-0001"
HELLO: Any = [{"role": "user", "content": "hello"}]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with run_stack(tmp_path, keys=[KEY]) as stack:
        yield stack


def sdk(stack: Stack, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=stack.url, api_key=MASTER_KEY, max_retries=0, **kw)


def sent(stack: Stack) -> dict[str, Any]:
    return stack.emulator.recent_requests(KEY)[-1]


async def test_system_prompts_stay_where_claude_code_puts_them(stack: Stack) -> None:
    async with sdk(stack) as client:
        await client.messages.create(model=PLAIN, max_tokens=64, system=[
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197"},
            {"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>today</system-reminder>"},
                {"type": "text", "text": "create out.txt", "cache_control": {"type": "ephemeral"}}]},
                {"role": "system", "content": "Available agent types: claude."},  # type: ignore[misc, list-item]
                {"role": "user", "content": [{"type": "text", "text": "go"},
                                             {"type": "mid_conv_system",  # type: ignore[list-item]
                                              "content": [{"type": "text", "text": "Be brief."}]},
                                             {"type": "text", "text": "now"}]}])
    assert sent(stack)["messages"] == [
        {"role": "system", "content": "x-anthropic-billing-header: cc_version=2.1.197\nYou are an agent."},
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>today</system-reminder>"},
                                     {"type": "text", "text": "create out.txt"}]},
        {"role": "system", "content": "Available agent types: claude."},
        {"role": "user", "content": "go"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "now"}]


async def test_images_documents_and_tool_results_become_parts_kimi_reads(stack: Stack) -> None:
    async with sdk(stack) as client:
        await client.messages.create(model=VISION, max_tokens=64, thinking={"type": "disabled"}, messages=[
            {"role": "user", "content": "Look."},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01A", "name": "Screenshot",
                                               "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "is_error": True,
                 "content": [{"type": "text", "text": "partial capture"},
                             {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "document", "title": "notes.txt", "source": {"type": "text", "media_type": "text/plain",
                                                                      "data": "line one"}},
                {"type": "text", "text": "What do you see?"}]}])
    messages = sent(stack)["messages"]
    assert messages[1]["tool_calls"][0]["id"] == "toolu_01A", "another provider's id goes back as it came"
    assert messages[2] == {"role": "tool", "tool_call_id": "toolu_01A", "content": "Error: partial capture"}
    assert messages[3] == {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "notes.txt\n\nline one"},
        {"type": "text", "text": "What do you see?"}]}
    async with sdk(stack) as client:  # a model without vision: refused, naming where the image is
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model=PLAIN, max_tokens=64, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}])
    assert refused.value.message.startswith("400 messages:") and "image input" in refused.value.message


async def test_sampling_follows_moonshots_anthropic_mapping(stack: Stack) -> None:
    async with sdk(stack) as client:
        await client.messages.create(model=PLAIN, max_tokens=64, messages=HELLO, stop_sequences=["\n\nHuman:"],
                                     extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40})  # gone from the SDK
    body = sent(stack)
    assert body["temperature"] == 0.3, "Anthropic's temperature x 0.6, as Moonshot's own endpoint runs it"
    assert body["top_p"] == 0.9 and body["stop"] == ["\n\nHuman:"] and "top_k" not in body
    async with sdk(stack) as client:
        await client.messages.create(model=PLAIN, max_tokens=64, messages=HELLO, extra_body={"temperature": 1})
    assert "temperature" not in sent(stack), "1 is the model's own default: K2.5+ refuse anything else"


async def test_structured_output_is_a_json_schema_response_format(stack: Stack) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"],
              "additionalProperties": False}
    async with sdk(stack) as client:
        message = await client.messages.create(model=PLAIN, max_tokens=64, messages=HELLO, tools=[],
                                               output_config={"format": {"type": "json_schema", "schema": schema}})
    body = sent(stack)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert "tools" not in body, "an empty tools list (Claude Code's title request) asks for none"
    assert isinstance(orjson.loads(message.content[0].text)["title"], str)  # type: ignore[union-attr]


async def test_a_last_assistant_turn_is_a_prefill(stack: Stack) -> None:
    async with sdk(stack) as client:
        message = await client.messages.create(model=PLAIN, max_tokens=64, messages=[
            *HELLO, {"role": "assistant", "content": "Hello from the"}])
    assert sent(stack)["messages"][-1] == {"role": "assistant", "content": "Hello from the", "partial": True}
    assert message.content[0].text.startswith(" Moonshot emulator")  # type: ignore[union-attr]


async def test_a_claude_code_sized_turn_passes_the_body_limit_and_reaches_kimi(stack: Stack) -> None:
    """24 tools, each schema with ``$schema`` and ``additionalProperties``, ~76 KB as Claude Code sends it."""
    tools = [{"name": f"Tool{i}", "description": "Does one thing well. " * 130, "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": False,
        "properties": {"command": {"type": "string", "description": "What to run."},
                       "timeout": {"type": "number"}, "run_in_background": {"type": "boolean"}},
        "required": ["command"]}} for i in range(24)]
    body = {"model": PLAIN, "max_tokens": 32000, "stream": True, "tools": tools, "messages": HELLO,
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "metadata": {"user_id": orjson.dumps({"device_id": "d", "account_uuid": "",
                                                  "session_id": str(uuid.uuid4())}).decode()}}
    raw = orjson.dumps(body)
    assert len(raw) > 70_000
    async with stack.http() as http:
        response = await http.post("/v1/messages?beta=true", content=raw, headers={
            "authorization": f"Bearer {MASTER_KEY}", "anthropic-version": "2023-06-01",
            "content-type": "application/json", "anthropic-beta": "claude-code-20250219,effort-2025-11-24"})
    assert response.status_code == 200 and "event: message_stop" in response.text
    upstream = sent(stack)
    assert len(upstream["tools"]) == 24
    assert all("$schema" not in t["function"]["parameters"] for t in upstream["tools"])
    assert all(t["function"]["parameters"]["additionalProperties"] is False for t in upstream["tools"])


async def test_claude_codes_session_keeps_a_conversation_on_one_account(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        async def accounts(metadata: dict[str, str] | None = None, **headers: str) -> set[str]:
            seen = set()
            async with sdk(stack, default_headers=headers) as client:
                for _ in range(6):
                    raw = await client.messages.with_raw_response.create(
                        model=PLAIN, max_tokens=64, messages=HELLO, metadata=metadata or {})  # type: ignore[arg-type]
                    seen.add(raw.headers["x-kimi-pool-account"])
            return seen

        session = orjson.dumps({"device_id": "d", "account_uuid": "", "session_id": str(uuid.uuid4())}).decode()
        assert len(await accounts({"user_id": session})) == 1
        assert len(await accounts({"user_id": f"user_abc_account__session_{uuid.uuid4()}"})) == 1
        assert len(await accounts(**{"x-claude-code-session-id": str(uuid.uuid4())})) == 1
        assert len(await accounts()) == 3, "one-off requests without a session go round the pool"


async def test_claude_codes_preconnect_is_answered(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        head = await http.head("/")
        root = await http.get("/")
    assert head.status_code == 200 and root.json()["anthropic"] == "/v1/messages"
