"""Batches end to end: the openai SDK against kimi-pool and the Moonshot emulator, on a manual clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from tests.batch.support import MODEL, read_lines, request_line, requests, start, upload
from tests.conftest import Stack, create_client_key, run_stack


async def test_the_sdk_uploads_runs_lists_and_reads_a_batch(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        client = stack.client()
        runner = stack.app.state.batch_runner
        uploaded = await client.files.create(file=("nightly.jsonl", b"".join(
            [b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "' + MODEL.encode()
             + b'", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}\n'])), purpose="batch")
        assert (uploaded.object, uploaded.purpose, uploaded.filename) == ("file", "batch", "nightly.jsonl")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h", metadata={"job": "nightly"})
        assert batch.object == "batch" and batch.status == "validating" and batch.metadata == {"job": "nightly"}
        assert batch.expires_at == batch.created_at + 86400
        assert await runner.wait_settled(batch.id) == "completed"

        done = await client.batches.retrieve(batch.id)
        assert done.status == "completed" and done.errors is None and done.error_file_id is None
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (1, 1, 0)
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        assert done.failed_at is done.cancelled_at is done.expired_at is None
        assert done.output_file_id is not None
        [line] = await read_lines(client, done.output_file_id)
        assert line["custom_id"] == "a" and line["error"] is None and line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["choices"][0]["message"]["content"] and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5

        with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
            await client.batches.create(input_file_id=done.output_file_id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        output = await client.files.retrieve(done.output_file_id)
        assert output.purpose == "batch_output" and output.filename == f"{batch.id}_output.jsonl"
        assert [b.id async for b in client.batches.list()] == [batch.id]
        assert {f.id async for f in client.files.list()} == {uploaded.id, output.id}
        assert [f.id async for f in client.files.list(purpose="batch")] == [uploaded.id]
        deleted = await client.files.delete(uploaded.id)
        assert deleted.deleted and deleted.id == uploaded.id
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(uploaded.id)
        assert (await client.batches.retrieve(batch.id)).status == "completed", "deleting its input changes nothing"


async def test_listings_page_with_limit_and_after(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        client = stack.client()
        ids = []
        for i in range(5):
            ids.append(await start(client, requests(1, prefix=f"b{i}")))
            stack.clock.advance(1)
        first = await client.batches.list(limit=2)
        assert [b.id for b in first.data] == ids[:-3:-1] and first.has_more
        assert [b.id async for b in client.batches.list(limit=2)] == ids[::-1], "the SDK follows the pages"
        rest = await client.batches.list(limit=10, after=ids[2])
        assert [b.id for b in rest.data] == [ids[1], ids[0]] and not rest.has_more


async def drive(stack: Stack, batch_id: str) -> str:
    """Run the batch to its end, moving the clock on whenever all that is left is to wait for a retry."""
    runner = stack.app.state.batch_runner
    while runner.settled(batch_id) is None:
        await runner.wait_for(lambda r: r.settled(batch_id) is not None
                              or (r.in_flight == 0 and r.retrying(batch_id) > 0))
        if runner.settled(batch_id) is None:
            passes = runner.passes
            stack.clock.advance(60)
            await runner.wait_for(lambda r, passes=passes: r.passes > passes)  # type: ignore[misc]
    return str(runner.settled(batch_id))


async def test_a_300_line_batch_through_faults_gives_one_output_line_per_custom_id(tmp_path: Path) -> None:
    malformed = [
        b"this is not json",
        {"method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL, "messages": []}},
        request_line("req-0007"),  # a second req-0007
        request_line("unknown-model", model="no-such-model"),
        {**request_line("no-messages"), "body": {"model": MODEL, "messages": []}},
        {**request_line("wrong-url"), "url": "/v1/embeddings"},
    ]
    lines = requests(300)
    for i, bad in enumerate(malformed):
        lines.insert(40 * i + 20, bad)
    async with run_stack(tmp_path) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 20}])
        stack.emulator.script("sk-emu-0002", [{"kind": "server_error"}, {"kind": "overloaded"},
                                              {"kind": "status", "status": 503, "type": "service_unavailable"},
                                              {"kind": "drop_after"}, {"kind": "html_504"}])
        stack.emulator.script("sk-emu-0003", [{"kind": "overloaded"}, {"kind": "server_error"}])
        client = stack.client()
        batch_id = await start(client, lines)
        assert await drive(stack, batch_id) == "completed"

        batch = await client.batches.retrieve(batch_id)
        counts = batch.request_counts
        assert counts is not None and (counts.total, counts.completed, counts.failed) == (306, 300, 6)
        output = await read_lines(client, batch.output_file_id)
        assert [line["custom_id"] for line in output] == [f"req-{i:04d}" for i in range(300)], "one each, in order"
        assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in output)
        assert len({line["response"]["body"]["id"] for line in output}) == 300
        errors = await read_lines(client, batch.error_file_id)
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            (None, "invalid_json_line"), (None, "missing_custom_id"), ("req-0007", "duplicate_custom_id"),
            ("unknown-model", "model_not_found"), ("no-messages", "invalid_request"), ("wrong-url", "invalid_url")]
        assert all(e["response"] is None for e in errors)
        assert errors[0]["error"]["message"].startswith("Line 21: not valid JSON")
        assert "'messages' is required" in errors[4]["error"]["message"]
        totals = stack.emulator.snapshot()["totals"]
        assert totals["completed"] == 300 and totals["dropped"] == 1, "every answer was delivered once"
        seen = totals["by_status"]
        assert seen["429"] >= 1 and seen["500"] >= 1 and seen["503"] == 1 and seen["504"] == 1, seen


HOLD = {"kind": "hold_after", "chunks": 0}


async def test_cancel_lets_requests_in_flight_finish_and_starts_no_other(tmp_path: Path) -> None:
    async with run_stack(tmp_path, account_extra={"concurrency": 5}, keys=["sk-emu-0001"]) as stack:
        stack.emulator.script(None, [HOLD] * 4)
        client = stack.client()
        runner = stack.app.state.batch_runner
        batch_id = await start(client, requests(10))
        await stack.emulator.wait_for(lambda e: e.held == 4)  # the batch share of 5: 4 at once
        await runner.wait_for(lambda r: r.in_flight == 10)  # and 6 waiting for a slot
        cancelling = await client.batches.cancel(batch_id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        await runner.wait_for(lambda r: r.in_flight == 4)  # those waiting are dropped; the 4 sent go on
        assert (await client.batches.retrieve(batch_id)).status == "cancelling"
        assert (await client.batches.cancel(batch_id)).status == "cancelling", "cancelling twice is harmless"
        stack.emulator.release()
        assert await runner.wait_settled(batch_id) == "cancelled"

        batch = await client.batches.retrieve(batch_id)
        assert batch.cancelled_at is not None and batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (4, 6)
        assert [line["custom_id"] for line in await read_lines(client, batch.output_file_id)] == [
            f"req-{i:04d}" for i in range(4)]
        errors = await read_lines(client, batch.error_file_id)
        assert [e["custom_id"] for e in errors] == [f"req-{i:04d}" for i in range(4, 10)]
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
        assert stack.emulator.snapshot()["totals"]["requests"] == 4, "nothing new was sent"
        finished = await start(client, requests(1, prefix="done"))
        assert await runner.wait_settled(finished) == "completed"
        with pytest.raises(openai.ConflictError, match="can no longer be cancelled"):
            await client.batches.cancel(finished)


async def test_a_batch_past_its_completion_window_expires(tmp_path: Path) -> None:
    async with run_stack(tmp_path, account_extra={"concurrency": 5}, keys=["sk-emu-0001"]) as stack:
        stack.emulator.script(None, [HOLD] * 4)
        client = stack.client()
        runner = stack.app.state.batch_runner
        batch_id = await start(client, requests(10), window="1h")
        await stack.emulator.wait_for(lambda e: e.held == 4)
        await runner.wait_for(lambda r: r.in_flight == 10)
        stack.clock.advance(3600)
        await runner.wait_for(lambda r: r.in_flight == 4)
        assert (await client.batches.retrieve(batch_id)).status == "in_progress", "until those in flight end"
        stack.emulator.release()
        assert await runner.wait_settled(batch_id) == "expired"
        batch = await client.batches.retrieve(batch_id)
        assert batch.expired_at == batch.expires_at and batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (4, 6)
        errors = await read_lines(client, batch.error_file_id)
        assert [e["error"]["code"] for e in errors] == ["batch_expired"] * 6
        assert "expired" in errors[0]["error"]["message"]


async def test_a_client_key_sees_only_its_own_files_and_batches(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path) as stack:
        alice = stack.client(await create_client_key(stack, "alice", capsys))
        bob = stack.client(await create_client_key(stack, "bob", capsys))
        file_id = await upload(alice, requests(2))
        batch_id = await start(alice, requests(2))
        assert await stack.app.state.batch_runner.wait_settled(batch_id) == "completed"
        for call in (bob.files.retrieve(file_id), bob.files.content(file_id), bob.files.delete(file_id),
                     bob.batches.retrieve(batch_id), bob.batches.cancel(batch_id),
                     bob.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                        completion_window="24h")):
            with pytest.raises(openai.NotFoundError):
                await call
        assert [b async for b in bob.batches.list()] == [] and [f async for f in bob.files.list()] == []
        assert [b.id async for b in alice.batches.list()] == [batch_id]
        output = (await alice.batches.retrieve(batch_id)).output_file_id
        assert output in {f.id async for f in alice.files.list()}, "the output belongs to the batch's owner"
        assert [b.id async for b in stack.client().batches.list()] == [batch_id], "the master key sees all"


async def test_batch_work_leaves_the_interactive_share_and_waiting_chat_requests_go_first(tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"], account_extra={"rpm": 10}) as stack:
        client, runner, admission = stack.client(), stack.app.state.batch_runner, stack.gateway.admission
        account = stack.gateway.pool.accounts["acct-1"]
        chat = [{"role": "user", "content": "are you there?"}]
        batch_id = await start(client, requests(20))
        await stack.emulator.wait_for(lambda e: e.stats.totals.completed == 8)  # 80% of rpm 10
        await runner.wait_for(lambda r: r.in_flight == 12)
        assert admission.batch_depth == 12 and account.limits.rpm.used(stack.clock.time()) == 8

        for _ in range(2):  # the share kept free: served at once, though 12 batch requests wait
            assert (await client.chat.completions.create(model=MODEL, messages=chat)).choices
        stack.clock.advance(40)
        waiting = [asyncio.create_task(client.chat.completions.create(model=MODEL, messages=chat)) for _ in range(5)]
        await admission.wait_depth(17)  # the minute is full: 5 chat requests wait with the 12 batch ones
        stack.clock.advance(21)  # the window rolls over
        await asyncio.gather(*waiting)
        await runner.wait_for(lambda r: r.in_flight == 9)
        # all 5 chat requests went first; the batch then took what was left of its 8
        assert stack.emulator.stats.totals.completed == 8 + 2 + 5 + 3
        assert account.limits.rpm.used(stack.clock.time()) == 8
        assert stack.emulator.snapshot()["totals"]["by_status"] == {"200": 18}
        assert (await client.batches.retrieve(batch_id)).request_counts.completed == 11  # type: ignore[union-attr]
        await client.batches.cancel(batch_id)
        assert await runner.wait_settled(batch_id) == "cancelled"
