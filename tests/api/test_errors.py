"""Bad input always gets an OpenAI error object with the right status; never a traceback or a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MASTER_KEY, Stack, run_stack

MODEL = "kimi-k2-0905-preview"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


def assert_error(response: Any, status: int, type_: str, code: str | None = None, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


@pytest.fixture
async def stack(tmp_path: Path) -> Any:
    async with run_stack(tmp_path, settings={"max_body_bytes": 64 * 1024}) as stack:
        yield stack


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"", None),
    (b"[1, 2]", None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "kimi-k2-0905-preview", "messages": []}', "messages"),
    (b'{"model": "kimi-k2-0905-preview", "messages": "hi"}', "messages"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
     "stream"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
     "temperature"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
     "max_tokens"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "n": 2}', "n"),
    # found by fuzzing: an object or a list where a string belongs, streaming or not
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": {"a": 1}, "content": "x"}], "stream": true}',
     "messages[0].role"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": ["user"], "content": "x"}]}', "messages[0].role"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e300}',
     "max_tokens"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e7}',
     "max_tokens"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "seed": 1e30}', "seed"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "response_format": '
     + b'{"type": "json_schema", "json_schema": {"name": "n", "schema": ' + b'{"a": ' * 300 + b"1" + b"}" * 300
     + b"}}}", "response_format"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}',
     "frobnicate"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "logprobs": true}',
     "logprobs"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "store": true}', "store"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], '
     b'"reasoning_effort": "high", "thinking": {"type": "disabled"}}', "reasoning_effort"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "x"}',
     "reasoning_effort"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "tool_choice": "always"}',
     "tool_choice"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": '
     b'"function", "function": {"name": "a"}}], "tool_choice": {"type": "function", "function": {"name": "b"}}}',
     "tool_choice"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "user", "content": [{"type": "input_audio", '
     b'"input_audio": {"data": "", "format": "wav"}}]}]}', "messages[0].content"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "tool", "content": "x"}]}', "messages[0].tool_call_id"),
    (b'{"model": "kimi-k2-0905-preview", "messages": [{"role": "assistant", "content": "x", "partial": true}, '
     b'{"role": "user", "content": "y"}]}', "messages[0].partial"),
])
async def test_malformed_requests_get_400_naming_the_parameter(stack: Stack, body: bytes, param: str | None) -> None:
    async with stack.http() as http:
        response = await http.post("/v1/chat/completions", content=body,
                                   headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 400, "invalid_request_error", param=param)
    assert stack.emulator.snapshot()["totals"]["requests"] == 0
    async with stack.http() as http:  # and the pool is as it was: nothing was charged, nothing breaks
        status = await http.get("/v1/pool/status", headers=AUTH)
    assert status.status_code == 200
    assert all(a["in_flight"] == 0 for a in status.json()["accounts"])


async def test_oversized_body_is_refused_before_reading_it_all(stack: Stack) -> None:
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * 100_000 + b'"}]}'
    async with stack.http() as http:
        response = await http.post("/v1/chat/completions", content=big, headers=AUTH)
    assert_error(response, 413, "invalid_request_error", code="payload_too_large")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"}])
async def test_missing_or_wrong_key_is_401(stack: Stack, headers: dict[str, str]) -> None:
    async with stack.http() as http:
        response = await http.post("/v1/chat/completions", headers=headers,
                                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        models = await http.get("/v1/models", headers=headers)
    assert_error(response, 401, "authentication_error", code="invalid_api_key")
    assert_error(models, 401, "authentication_error")


async def test_unknown_model_is_404_model_not_found(stack: Stack) -> None:
    async with stack.http() as http:
        response = await http.post("/v1/chat/completions", headers=AUTH,
                                   json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
        single = await http.get("/v1/models/gpt-9", headers=AUTH)
    assert_error(response, 404, "invalid_request_error", code="model_not_found", param="model")
    assert_error(single, 404, "invalid_request_error", code="model_not_found")


async def test_unknown_path_is_404_and_wrong_method_405_with_allow(stack: Stack) -> None:
    async with stack.http() as http:
        missing = await http.get("/v1/nothing-here", headers=AUTH)
        wrong = await http.get("/v1/chat/completions", headers=AUTH)
    assert_error(missing, 404, "invalid_request_error", code="not_found")
    assert_error(wrong, 405, "invalid_request_error", code="method_not_allowed")
    assert wrong.headers["allow"] == "POST"


async def test_an_upstream_4xx_about_the_request_is_passed_on(stack: Stack) -> None:
    stack.emulator.script(None, [{"kind": "status", "status": 400, "type": "invalid_request_error",
                                  "message": "Invalid request: temperature out of range for this model"}])
    async with stack.http() as http:
        response = await http.post("/v1/chat/completions", headers=AUTH,
                                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert_error(response, 400, "invalid_request_error")
    assert "temperature out of range" in response.json()["error"]["message"]
    assert stack.emulator.snapshot()["totals"]["requests"] == 1, "a bad request is not retried elsewhere"


async def test_no_account_able_to_serve_is_503_or_429_with_retry_after(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        stack.emulator.script(None, [{"kind": "rate_limit", "bucket": "rpm", "wait": 7}] * 3)
        limited = await http.post("/v1/chat/completions", headers=AUTH, json=body)
        assert_error(limited, 429, "rate_limit_error")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert int(limited.headers["retry-after"]) == 7
        stack.emulator.script(None, [{"kind": "auth"}] * 3)
        stack.clock.advance(60)
        dead = await http.post("/v1/chat/completions", headers=AUTH, json=body)
        assert_error(dead, 503, "service_unavailable")
        assert 1 <= int(dead.headers["retry-after"]) <= 60
