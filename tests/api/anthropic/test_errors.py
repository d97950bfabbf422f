"""Errors on the Anthropic paths come in Anthropic's shape and statuses, so the ``anthropic`` SDK raises its typed
exception for each, and Claude Code retries what it should (429 and 529 with ``retry-after``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import MASTER_KEY, Stack, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO: Any = [{"role": "user", "content": "hello"}]
BODY = {"model": MODEL, "max_tokens": 64, "messages": HELLO}
HEADERS = {"x-api-key": MASTER_KEY, "anthropic-version": "2023-06-01"}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with run_stack(tmp_path, settings={"max_body_bytes": 64 * 1024}) as stack:
        yield stack


def sdk(stack: Stack, api_key: str = MASTER_KEY, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=stack.url, api_key=api_key, max_retries=0, **kw)


def assert_error(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"type", "error", "request_id"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind and body["error"]["message"]
    assert body["request_id"] == response.headers["request-id"] == response.headers["x-request-id"]
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("body", "named"), [
    (b"{not json", "JSON"),
    (b"[1]", "JSON object"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}]}', "max_tokens"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}',
     "max_tokens"),
    (b'{"max_tokens": 9, "messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": []}', "messages"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "robot", "content": "x"}]}',
     "messages[0].role"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "user", "content": 5}]}',
     "messages[0].content"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}], '
     b'"temperature": 1.5}', "temperature"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}], '
     b'"frobnicate": 1}', "frobnicate"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}], '
     b'"thinking": {"type": "enabled", "budget_tokens": 2048}}', "budget_tokens"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}], '
     b'"tool_choice": {"type": "tool", "name": "Bash"}}', "tool_choice"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}], '
     b'"tools": [{"type": "web_search_20250305", "name": "web_search"}]}', "web_search_20250305"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "user", "content": [{"type": '
     b'"document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]}', "PDF"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "assistant", "content": [{"type": '
     b'"thinking", "thinking": "hmm", "signature": "not-ours"}]}, {"role": "user", "content": "x"}]}',
     "signature"),
    (b'{"model": "kimi-k2-0905-preview", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}], '
     b'"metadata": {"user_id": "u", "tenant": "t"}}', "metadata.tenant"),
])
async def test_malformed_requests_get_400_saying_what_is_wrong(stack: Stack, body: bytes, named: str) -> None:
    async with stack.http() as http:
        response = await http.post("/v1/messages", content=body,
                                   headers={**HEADERS, "content-type": "application/json"})
    error = assert_error(response, 400, "invalid_request_error")
    assert named in error["message"]
    assert stack.emulator.snapshot()["totals"]["requests"] == 0, "refused before any upstream call"


async def test_thinking_on_a_model_that_never_thinks_is_refused_naming_thinking(stack: Stack) -> None:
    async with sdk(stack) as client:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model=MODEL, max_tokens=4096, messages=HELLO,
                                         thinking={"type": "enabled", "budget_tokens": 1024})
    assert refused.value.message.startswith("400 thinking:")


async def test_each_failure_raises_the_sdks_typed_exception(stack: Stack, tmp_path: Path) -> None:
    async with sdk(stack) as client:
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model=MODEL, max_tokens=64, messages=[])
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(model="claude-opus-4-8", max_tokens=64, messages=HELLO)
        with pytest.raises(anthropic.ContentTooLargeError) as large:
            await client.messages.create(model=MODEL, max_tokens=64,
                                         messages=[{"role": "user", "content": "a" * 100_000}])
        assert large.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
    for wrong in (sdk(stack, api_key="wrong"), anthropic.AsyncAnthropic(base_url=stack.url, auth_token="wrong",
                                                                        max_retries=0)):
        async with wrong as client:
            with pytest.raises(anthropic.AuthenticationError) as denied:
                await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
        assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=None, auth_token=MASTER_KEY,
                                        max_retries=0) as bearer:
        assert (await bearer.messages.create(model=MODEL, max_tokens=64, messages=HELLO)).content

    stack.emulator.script(None, [{"kind": "rate_limit", "bucket": "rpm", "wait": 7}] * 3)
    async with sdk(stack) as client:
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]

    stack.clock.advance(60)
    stack.emulator.script(None, [{"kind": "overloaded"}] * 3)
    async with sdk(stack) as client:
        with pytest.raises(anthropic.OverloadedError) as overloaded:
            await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert overloaded.value.status_code == 529 and int(overloaded.value.response.headers["retry-after"]) >= 1
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert isinstance(overloaded.value, anthropic.InternalServerError), "the SDK and Claude Code retry it"


async def test_a_pool_whose_accounts_are_all_dead_is_overloaded_with_retry_after(stack: Stack) -> None:
    stack.emulator.script(None, [{"kind": "auth"}] * 3)
    async with stack.http() as http:
        response = await http.post("/v1/messages", json={**BODY, "stream": True}, headers=HEADERS)
    error = assert_error(response, 529, "overloaded_error")
    assert "dead" in error["message"] or "failed" in error["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 60


async def test_a_full_queue_is_overloaded_not_rate_limited(tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"], account_extra={"concurrency": 1},
                         settings={"max_queue": 0}) as stack, stack.http() as http:
        stack.emulator.script(None, [{"kind": "hold_after", "chunks": 0}])
        held = asyncio.create_task(http.post("/v1/messages", json=BODY, headers=HEADERS))
        await stack.emulator.wait_for(lambda e: e.held == 1)
        response = await http.post("/v1/messages", json=BODY, headers=HEADERS)
        error = assert_error(response, 529, "overloaded_error")
        assert "queue is full" in error["message"] and response.headers["retry-after"]
        stack.emulator.release()
        assert (await held).status_code == 200


async def test_an_open_gateway_refuses_a_foreign_host_in_anthropics_shape(tmp_path: Path) -> None:
    async with run_stack(tmp_path, settings={"master_key": None}) as stack:
        async with sdk(stack, default_headers={"Host": "evil.example"}) as client:
            with pytest.raises(anthropic.PermissionDeniedError) as refused:
                await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
        assert refused.value.body["type"] == "error"  # type: ignore[index]
        assert refused.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
        async with sdk(stack, api_key="anything") as client:  # open: any key (or none) from loopback
            assert (await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)).content


async def test_wrong_method_and_unknown_path_under_messages_answer_in_anthropics_shape(stack: Stack) -> None:
    async with stack.http() as http:
        wrong = await http.get("/v1/messages", headers=HEADERS)
        missing = await http.post("/v1/messages/nothing", json=BODY, headers=HEADERS)
    assert_error(wrong, 405, "invalid_request_error")
    assert wrong.headers["allow"] == "POST"
    assert_error(missing, 404, "not_found_error")
