"""The batch runner's retries and final errors, one account, on a manual clock."""

from __future__ import annotations

from pathlib import Path

from app.batch.runner import BACKOFF
from tests.batch.support import read_lines, requests, start
from tests.conftest import run_stack


async def test_a_failed_request_is_tried_again_after_a_backoff_on_the_clock(tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"]) as stack:
        client, runner = stack.client(), stack.app.state.batch_runner
        stack.emulator.script(None, [{"kind": "server_error"}])
        batch_id = await start(client, requests(1))
        await runner.wait_for(lambda r: r.retrying(batch_id) == 1 and r.in_flight == 0)
        stack.clock.advance(BACKOFF - 0.5)
        await runner.wait_for(lambda r: r.in_flight == 0)
        assert runner.settled(batch_id) is None and stack.emulator.stats.totals.requests == 1, "not yet"
        stack.clock.advance(0.5)
        assert await runner.wait_settled(batch_id) == "completed"
        batch = await client.batches.retrieve(batch_id)
        assert batch.request_counts is not None and batch.request_counts.completed == 1
        assert stack.emulator.stats.totals.requests == 2


async def test_a_request_failing_every_attempt_ends_in_the_error_file_with_its_last_answer(tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"]) as stack:
        client, runner = stack.client(), stack.app.state.batch_runner
        stack.emulator.script(None, [{"kind": "server_error"}] * 5)
        batch_id = await start(client, requests(1))
        for attempt in range(1, 5):
            await stack.emulator.wait_for(lambda e, n=attempt: e.stats.totals.requests == n)  # type: ignore[misc]
            await runner.wait_for(lambda r: r.retrying(batch_id) == 1 and r.in_flight == 0)
            stack.clock.advance(60)
        assert await runner.wait_settled(batch_id) == "completed"
        batch = await client.batches.retrieve(batch_id)
        assert batch.output_file_id is None and batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 1)
        [line] = await read_lines(client, batch.error_file_id)
        assert line["custom_id"] == "req-0000" and line["error"]["code"] == "no_account_available"
        assert line["response"]["status_code"] == 503 and "HTTP 500" in line["response"]["body"]["error"]["message"]
        assert stack.emulator.stats.totals.requests == 5


async def test_a_request_the_upstream_refuses_is_a_final_error_at_once(tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"]) as stack:
        client, runner = stack.client(), stack.app.state.batch_runner
        stack.emulator.script(None, [{"kind": "status", "status": 400, "type": "invalid_request_error",
                                      "message": "Invalid request: your prompt is too spicy"}])
        batch_id = await start(client, requests(1))
        assert await runner.wait_settled(batch_id) == "completed"
        [line] = await read_lines(client, (await client.batches.retrieve(batch_id)).error_file_id)
        assert line["response"]["status_code"] == 400 and "too spicy" in line["error"]["message"]
        assert stack.emulator.stats.totals.requests == 1


async def test_a_file_with_no_valid_request_fails_the_batch_with_the_reasons(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        client, runner = stack.client(), stack.app.state.batch_runner
        broken = await start(client, [b"{", {"custom_id": "x", "method": "GET"}])
        assert await runner.wait_settled(broken) == "failed"
        batch = await client.batches.retrieve(broken)
        assert batch.failed_at is not None and batch.errors is not None and batch.errors.data is not None
        assert [(e.code, e.line) for e in batch.errors.data] == [
            ("no_valid_requests", None), ("invalid_json_line", 1), ("invalid_method", 2)]
        latin = (await client.files.create(file=("l.jsonl", "caf\xe9\n".encode("latin-1")), purpose="batch")).id
        batch = await client.batches.create(input_file_id=latin, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        assert await runner.wait_settled(batch.id) == "failed"
        errors = (await client.batches.retrieve(batch.id)).errors
        assert errors is not None and errors.data is not None and errors.data[0].code == "invalid_file_encoding"
