"""``Idempotency-Key`` on ``POST /v1/chat/completions``: real gateway and emulator, the openai SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from sqlalchemy import text

from app.clock import ManualClock
from app.emulator.moonshot import MoonshotEmulatorConfig
from app.store.db import Database
from tests.conftest import MASTER_KEY, Stack, create_client_key, run_stack

MODEL = "kimi-k2-0905-preview"
THINKING = "kimi-k2-thinking"
HELLO = [{"role": "user", "content": "Say hello to the pool."}]
KEY = "retry-me-0001"
ONE_KEY = MoonshotEmulatorConfig.simple(keys=1)


def upstream_requests(stack: Stack) -> int:
    return int(stack.emulator.snapshot()["keys"]["sk-emu-0001"]["requests"])


def keyed(key: str = KEY) -> dict[str, Any]:
    return {"extra_headers": {"Idempotency-Key": key}}


async def stored_keys(stack: Stack) -> list[str]:
    db = Database(stack.db_url)
    try:
        async with db.session() as session:
            return list((await session.execute(text("select key from idempotency_keys order by key"))).scalars())
    finally:
        await db.dispose()


def sse_events(body: str) -> list[Any]:
    frames = [f.removeprefix("data: ") for f in body.split("\n\n") if f]
    return [frame if frame == "[DONE]" else orjson.loads(frame) for frame in frames]


async def test_a_retry_gets_the_stored_answer_and_spends_nothing(tmp_path: Path) -> None:
    async with run_stack(tmp_path, emulator=ONE_KEY) as stack:
        chat = stack.client().chat.completions
        first = await chat.with_raw_response.create(model=MODEL, messages=HELLO, **keyed())
        again = await chat.with_raw_response.create(model=MODEL, messages=HELLO, **keyed())
        assert "idempotent-replayed" not in first.headers
        assert first.headers["x-kimi-pool-account"] == "acct-1"
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["x-request-id"] != first.headers["x-request-id"]
        assert again.parse().model_dump() == first.parse().model_dump()  # same id, content and usage
        assert upstream_requests(stack) == 1

        await stack.app.state.writer.flush()  # now only the database holds it
        assert await stored_keys(stack) == [f"master:{KEY}"]
        third = await chat.create(model=MODEL, messages=HELLO, **keyed())
        assert third.id == first.parse().id and upstream_requests(stack) == 1

        plain = await chat.create(model=MODEL, messages=HELLO)
        assert plain.id != third.id and upstream_requests(stack) == 2

        async with stack.http() as http:
            metrics = (await http.get("/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"})).text
        assert (f'kimi_pool_requests_total{{account="",client_key="master",model="{MODEL}",outcome="replayed"}} 2.0'
                in metrics)


async def test_keys_are_scoped_by_client_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, emulator=ONE_KEY) as stack:
        team = await create_client_key(stack, "team-a", capsys)
        mine = await stack.client().chat.completions.create(model=MODEL, messages=HELLO, **keyed())
        theirs = await stack.client(team).chat.completions.create(model=MODEL, messages=HELLO, **keyed())
        theirs_again = await stack.client(team).chat.completions.create(model=MODEL, messages=HELLO, **keyed())
        assert mine.id != theirs.id == theirs_again.id
        assert upstream_requests(stack) == 2
        await stack.app.state.writer.flush()
        assert await stored_keys(stack) == [f"master:{KEY}", f"team-a:{KEY}"]


async def test_the_same_key_with_another_body_is_refused(tmp_path: Path) -> None:
    async with run_stack(tmp_path, emulator=ONE_KEY) as stack:
        chat = stack.client().chat.completions
        await chat.create(model=MODEL, messages=HELLO, **keyed())
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            await chat.create(model=MODEL, messages=HELLO, temperature=0.2, **keyed())
        error = refused.value.body
        assert isinstance(error, dict)
        assert error["code"] == "idempotency_key_mismatch" and error["type"] == "invalid_request_error"
        assert error["param"] == "Idempotency-Key"
        # how the answer is delivered is not part of the request: a streaming retry is the same request
        stream = await chat.create(model=MODEL, messages=HELLO, stream=True, **keyed())
        assert [chunk async for chunk in stream]
        assert upstream_requests(stack) == 1


async def test_concurrent_requests_with_one_key_make_one_upstream_request(tmp_path: Path) -> None:
    async with run_stack(tmp_path, emulator=ONE_KEY) as stack:
        chat = stack.client().chat.completions
        stack.emulator.script(None, [{"kind": "hold_after"}])
        first = asyncio.create_task(chat.with_raw_response.create(model=MODEL, messages=HELLO, **keyed()))
        await stack.emulator.wait_for(lambda emu: emu.held == 1)
        second = asyncio.create_task(chat.with_raw_response.create(model=MODEL, messages=HELLO, **keyed()))
        await stack.app.state.idempotency.wait_waiting(1)
        with pytest.raises(openai.UnprocessableEntityError):  # another body is refused at once, not made to wait
            await chat.create(model=MODEL, messages=[{"role": "user", "content": "other"}], **keyed())
        stack.emulator.release()
        answers = await asyncio.gather(first, second)
        assert answers[0].parse().model_dump() == answers[1].parse().model_dump()
        assert [a.headers.get("idempotent-replayed") for a in answers] == [None, "true"]
        assert upstream_requests(stack) == 1


async def test_a_failed_answer_is_not_stored_and_the_retry_runs(tmp_path: Path) -> None:
    async with run_stack(tmp_path, emulator=ONE_KEY) as stack:
        chat = stack.client().chat.completions
        stack.emulator.script(None, [{"kind": "status", "status": 400, "type": "invalid_request_error",
                                      "message": "Invalid request: refused for the test"}])
        with pytest.raises(openai.BadRequestError):
            await chat.create(model=MODEL, messages=HELLO, **keyed())
        raw = await chat.with_raw_response.create(model=MODEL, messages=HELLO, **keyed())
        assert "idempotent-replayed" not in raw.headers and raw.parse().choices[0].message.content
        assert upstream_requests(stack) == 2
        again = await chat.create(model=MODEL, messages=HELLO, **keyed())
        assert again.id == raw.parse().id and upstream_requests(stack) == 2


async def test_a_waiting_retry_runs_itself_when_the_first_attempt_fails(tmp_path: Path) -> None:
    async with run_stack(tmp_path, emulator=ONE_KEY) as stack, stack.http() as http:
        stack.emulator.script(None, [{"kind": "hold_after", "chunks": 2}])
        headers = {"Authorization": f"Bearer {MASTER_KEY}", "Idempotency-Key": KEY}
        body = {"model": MODEL, "messages": HELLO, "stream": True}
        waiting = None
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            lines = response.aiter_lines()
            while "content" not in await anext(lines):
                pass
            waiting = asyncio.create_task(http.post("/v1/chat/completions", json={**body, "stream": False},
                                                    headers=headers))
            await stack.app.state.idempotency.wait_waiting(1)
        # the first client went away mid-stream: its answer is incomplete, so the waiting retry runs
        retry = await waiting
        assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
        assert retry.json()["choices"][0]["message"]["content"]
        assert upstream_requests(stack) == 2
        stack.emulator.release()


async def test_a_key_runs_again_after_the_ttl_and_expired_answers_are_purged(tmp_path: Path) -> None:
    clock = ManualClock()
    async with run_stack(tmp_path, emulator=ONE_KEY, clock=clock) as stack:
        chat = stack.client().chat.completions
        first = await chat.create(model=MODEL, messages=HELLO, **keyed())
        await chat.create(model=MODEL, messages=HELLO, **keyed("other-key"))
        await stack.app.state.writer.flush()
        clock.advance(stack.gateway.settings.idempotency_ttl - 1)
        assert (await chat.create(model=MODEL, messages=HELLO, **keyed())).id == first.id
        clock.advance(1)
        later = await chat.with_raw_response.create(model=MODEL, messages=HELLO, **keyed())
        assert later.parse().id != first.id and "idempotent-replayed" not in later.headers
        assert upstream_requests(stack) == 3
        await stack.app.state.writer.flush()  # writing the new answer deletes the expired one
        assert await stored_keys(stack) == [f"master:{KEY}"]


async def test_a_stored_answer_survives_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    async with run_stack(tmp_path, emulator=ONE_KEY, clock=clock) as stack:
        first = await stack.client().chat.completions.create(model=MODEL, messages=HELLO, **keyed())
    # the first server is gone (its last answers written on the way out); a new one on the same database
    async with run_stack(tmp_path, emulator=ONE_KEY, clock=clock) as stack:
        raw = await stack.client().chat.completions.with_raw_response.create(model=MODEL, messages=HELLO,
                                                                             **keyed())
        assert raw.headers["idempotent-replayed"] == "true"
        assert raw.parse().model_dump() == first.model_dump()
        assert upstream_requests(stack) == 0


async def test_a_streamed_answer_is_replayed_as_a_stream_or_as_one_completion(tmp_path: Path) -> None:
    async with run_stack(tmp_path, emulator=ONE_KEY) as stack, stack.http() as http:
        headers = {"Authorization": f"Bearer {MASTER_KEY}", "Idempotency-Key": KEY}
        body = {"model": THINKING, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
        original = await http.post("/v1/chat/completions", json=body, headers=headers)
        replay = await http.post("/v1/chat/completions", json=body, headers=headers)
        assert original.status_code == replay.status_code == 200
        assert replay.headers["content-type"].startswith("text/event-stream")
        assert replay.headers["idempotent-replayed"] == "true"
        sent, again = sse_events(original.text), sse_events(replay.text)
        assert again[-1] == "[DONE]" and sent[-1] == "[DONE]"
        chunks, first_chunks = again[:-1], sent[:-1]
        assert {c["id"] for c in chunks} == {c["id"] for c in first_chunks} and len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert [f for f in finishes if f] == ["stop"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == first_chunks[-1]["usage"]

        def joined(events: list[Any], field: str) -> str:
            return "".join(c["choices"][0]["delta"].get(field) or "" for c in events if c["choices"])

        for field in ("content", "reasoning_content"):
            assert joined(chunks, field) == joined(first_chunks, field) != ""

        whole = await http.post("/v1/chat/completions", json={**body, "stream": False}, headers=headers)
        completion = whole.json()
        assert whole.headers["idempotent-replayed"] == "true"
        assert completion["object"] == "chat.completion" and completion["id"] == chunks[0]["id"]
        message = completion["choices"][0]["message"]
        assert message["content"] == joined(first_chunks, "content")
        assert message["reasoning_content"] == joined(first_chunks, "reasoning_content")
        assert completion["choices"][0]["finish_reason"] == "stop"
        assert completion["usage"] == first_chunks[-1]["usage"]
        assert upstream_requests(stack) == 1


async def test_a_whole_answer_is_replayed_to_a_streaming_retry(tmp_path: Path) -> None:
    async with run_stack(tmp_path, emulator=ONE_KEY) as stack:
        chat = stack.client().chat.completions
        first = await chat.create(model=MODEL, messages=HELLO, **keyed())
        stream = await chat.create(model=MODEL, messages=HELLO, stream=True, **keyed())
        chunks = [chunk async for chunk in stream]
        assert {c.id for c in chunks} == {first.id}
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == first.choices[0].message.content
        assert all(c.usage is None for c in chunks), "no usage chunk unless the client asks"
        assert upstream_requests(stack) == 1


@pytest.mark.parametrize("value", [b"", b"x" * 256, "caf\u00e9".encode(), b"tab\there"])
async def test_a_bad_key_is_refused(tmp_path: Path, value: bytes) -> None:
    async with run_stack(tmp_path, emulator=ONE_KEY) as stack, stack.http() as http:
        response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                                   headers={"Authorization": f"Bearer {MASTER_KEY}", "Idempotency-Key": value})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "Idempotency-Key" and "Idempotency-Key" in error["message"]
        assert upstream_requests(stack) == 0
        longest = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                                  headers={"Authorization": f"Bearer {MASTER_KEY}", "Idempotency-Key": "k" * 255})
        assert longest.status_code == 200
