"""One access line per request (``kimi_pool.access``), JSON lines from a real ``serve --log-format json``,
and no credential in any log record."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from pathlib import Path

import openai
import pytest

from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from app.logs import Fields, JsonFormatter
from app.serve import QUIET_LOGGERS, TEXT_FORMAT
from tests.conftest import MASTER_KEY, create_client_key, gateway_process, read_until, run_stack, serve

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]


def access_lines(caplog: pytest.LogCaptureFixture) -> dict[str, Fields]:
    """The access lines captured so far, by request id (each id must appear once)."""
    lines: dict[str, Fields] = {}
    for record in caplog.records:
        if record.name == "kimi_pool.access":
            assert isinstance(record.msg, Fields) and record.levelno == logging.INFO
            assert record.msg["request_id"] not in lines, "one line per request"
            lines[str(record.msg["request_id"])] = record.msg
    return lines


async def test_one_access_line_per_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kimi_pool")
    async with run_stack(tmp_path) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "rate_limit", "wait": 30}])
        client = stack.client()
        seen = {}
        for n in range(3):  # one of them meets acct-1's 429 and moves on
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO, extra_headers={"X-Request-Id": f"plain-{n}"})
            seen[f"plain-{n}"] = (raw.headers["x-kimi-pool-account"], raw.parse().usage)
        raw_stream = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True},
            extra_headers={"X-Request-Id": "streamed"})
        chunks = [chunk async for chunk in raw_stream.parse()]
        seen["streamed"] = (raw_stream.headers["x-kimi-pool-account"], chunks[-1].usage)
        with pytest.raises(openai.AuthenticationError):
            await stack.client("wrong").chat.completions.create(model=MODEL, messages=HELLO,
                                                                extra_headers={"X-Request-Id": "refused"})

    lines = access_lines(caplog)
    assert set(lines) == {*seen, "refused"}
    for request_id, (account, usage) in seen.items():
        line = lines[request_id]
        assert usage is not None
        assert (line["client"], line["account"], line["model"], line["status"], line["outcome"]) == (
            "master", account, MODEL, 200, "ok")
        assert (line["prompt_tokens"], line["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
        assert line["stream"] is (request_id == "streamed")
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
        assert line["wait_ms"] == 0.0
        assert ("first_byte_ms" in line) is (request_id == "streamed")
    assert sorted(line["attempts"] for line in lines.values()) == [0, 1, 1, 1, 2], "the 429 cost one more attempt"
    refused = lines["refused"]
    assert (refused["client"], refused["account"], refused["status"], refused["outcome"], refused["attempts"]) == (
        None, None, 401, "invalid_api_key", 0)

    [failed] = [r for r in caplog.records if r.name == "kimi_pool.upstream"]
    assert isinstance(failed.msg, Fields)
    assert (failed.msg["account"], failed.msg["error"], failed.msg["status"]) == ("acct-1", "RateLimited", 429)

    text = next(r.getMessage() for r in caplog.records if r.name == "kimi_pool.access"
                and r.msg["request_id"] == "streamed")  # type: ignore[index]
    assert re.fullmatch(
        r"request_id=streamed client=master account=acct-\d model=kimi-k2-0905-preview stream=true status=200 "
        r"outcome=ok prompt_tokens=\d+ completion_tokens=\d+ latency_ms=[\d.]+ attempts=1 wait_ms=0\.0 "
        r"first_byte_ms=[\d.]+", text), text
    refused_text = next(r.getMessage() for r in caplog.records if r.name == "kimi_pool.access"
                        and r.msg["request_id"] == "refused")  # type: ignore[index]
    assert "client=- account=- model=" in refused_text


def test_a_value_with_spaces_or_quotes_is_quoted_in_text() -> None:
    assert str(Fields(model='a "b"\nc', n=1, ok=False, gone=None)) == r'model="a \"b\"\nc" n=1 ok=false gone=-'


async def test_json_lines_from_a_real_serve_process_at_debug_without_a_credential(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url, gateway_process(
            tmp_path, emulator_url, "--log-format", "json", "--log-level", "debug") as (process, url, log):
        assert process.stderr is not None
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0)
        completion = await client.chat.completions.create(model=MODEL, messages=HELLO,
                                                          extra_headers={"X-Request-Id": "json-1"})
        await client.close()
        assert completion.usage is not None
        await asyncio.wait_for(read_until(process.stderr, '"request_id":"json-1"', log), 30)
        process.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode()
        assert await process.wait() == 0

    lines = [*log, *rest.splitlines(keepends=True)]
    objects = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"ts", "level", "logger"} <= set(objects[0])
    assert any(o["logger"] == "uvicorn.error" and "Application startup complete" in o["message"] for o in objects)
    [access] = [o for o in objects if o["logger"] == "kimi_pool.access"]
    assert access | {"ts": None, "latency_ms": None, "wait_ms": None} == {
        "ts": None, "level": "INFO", "logger": "kimi_pool.access", "request_id": "json-1", "client": "master",
        "account": "acct-1", "model": MODEL, "stream": False, "status": 200, "outcome": "ok",
        "prompt_tokens": completion.usage.prompt_tokens, "completion_tokens": completion.usage.completion_tokens,
        "latency_ms": None, "attempts": 1, "wait_ms": None}
    assert MASTER_KEY not in "".join(lines) and "sk-emu-0001" not in "".join(lines)


async def test_no_credential_reaches_a_log_record(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    for name in QUIET_LOGGERS:  # as serve's configure_logging does (the next test checks a real serve at debug)
        caplog.set_level(logging.INFO, logger=name)
    async with run_stack(tmp_path) as stack, stack.http() as http:
        alice = await create_client_key(stack, "alice", capsys)
        stack.emulator.script("sk-emu-0001", [{"kind": "auth"}])  # a dead key, failed over
        stack.emulator.script("sk-emu-0002", [{"kind": "rate_limit", "wait": 5}])
        body = {"model": MODEL, "messages": HELLO}
        for headers in ({"Authorization": f"Bearer {MASTER_KEY}"}, {"X-Api-Key": MASTER_KEY},
                        {"Authorization": f"Bearer {alice}"}, {"X-Api-Key": alice}):
            assert (await http.post("/v1/chat/completions", json=body, headers=headers)).status_code == 200
            assert (await http.post("/v1/chat/completions", json={**body, "stream": True},
                                    headers=headers)).status_code == 200
        for headers in ({"Authorization": f"Bearer {alice}x"}, {"Authorization": f"Basic {alice}"}, {}):
            assert (await http.post("/v1/chat/completions", json=body, headers=headers)).status_code == 401
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {alice}"})).status_code == 403
        assert (await http.get("/v1/pool/status", headers={"X-Api-Key": alice})).status_code == 200
        assert stack.gateway.pool.accounts["acct-1"].state == "auth_dead"

    secrets = [MASTER_KEY, alice, "sk-emu-0001", "sk-emu-0002", "sk-emu-0003"]
    text, structured = logging.Formatter(TEXT_FORMAT), JsonFormatter()
    assert len([r for r in caplog.records if r.name == "kimi_pool.access"]) == 11
    for record in caplog.records:
        for rendered in (text.format(record), structured.format(record), repr(record.__dict__)):
            assert not any(secret in rendered for secret in secrets), rendered
