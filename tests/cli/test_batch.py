"""``kimi-pool batch``: a person with a file in hand, against a real running gateway."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from app.cli import run
from tests.batch.support import jsonl, request_line, requests, start
from tests.conftest import MASTER_KEY, Stack, read_until, run_stack


def write_input(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl(requests(count)))
    return path


def results(path: Path) -> dict[str, dict[str, object]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "no custom_id twice"
    return by_id


def cli_args(stack: Stack, source: Path, output: Path) -> list[str]:
    return ["batch", "run", str(source), "-o", str(output), "--url", stack.url, "--key", MASTER_KEY,
            "--poll", "0.05"]


async def test_batch_run_writes_one_result_per_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path) as stack:
        source = write_input(tmp_path, 12)
        (tmp_path / "bad.jsonl").write_bytes(jsonl([request_line("bad-1", model="no-such-model"),
                                                    *requests(3, "ok")]))
        output = tmp_path / "out" / "results.jsonl"
        output.parent.mkdir()
        assert await asyncio.to_thread(run, cli_args(stack, source, output)) == 0
        got = results(output)
        assert sorted(got) == [f"req-{i:04d}" for i in range(12)]
        assert all(line["response"]["status_code"] == 200 for line in got.values())  # type: ignore[index]
        assert not (output.parent / "results.jsonl.batch.json").exists(), "done: nothing left to resume"
        out = capsys.readouterr().out
        assert "12 of 12 requests sent" in out and "12 results written" in out
        found = re.search(r"batch (batch_\w+): 12 of 12", out)
        assert found is not None
        async with stack.http() as http:
            batch = (await http.get(f"/v1/batches/{found.group(1)}", headers={"Authorization": f"Bearer {MASTER_KEY}"}
                                    )).json()
        shares = batch["kimi_pool"]["accounts"]
        assert sum(shares.values()) == 12 and set(shares) == {"acct-1", "acct-2", "acct-3"}
        assert "acct-1 " in out and "%" in out, "the progress line shows each account's share"

        # a second run finds everything answered and sends nothing
        assert await asyncio.to_thread(run, cli_args(stack, source, output)) == 0
        assert "all 12 requests already have results" in capsys.readouterr().out

        # a malformed request is a failure line, not the end of the job
        bad_out = tmp_path / "bad-results.jsonl"
        assert await asyncio.to_thread(run, cli_args(stack, tmp_path / "bad.jsonl", bad_out)) == 0
        assert sorted(results(bad_out)) == ["ok-0000", "ok-0001", "ok-0002"]
        [failure] = results(tmp_path / "bad-results.errors.jsonl").values()
        assert failure["custom_id"] == "bad-1" and "no-such-model" in json.dumps(failure)


async def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path: Path) -> None:
    async with run_stack(tmp_path, account_extra={"concurrency": 1}) as stack:  # 3 in flight, the rest wait
        source = write_input(tmp_path, 9)
        output = tmp_path / "results.jsonl"
        for key in ("sk-emu-0001", "sk-emu-0002", "sk-emu-0003"):  # the first request on each account waits
            stack.emulator.script(key, [{"kind": "hold_after", "chunks": 0}])
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", *cli_args(stack, source, output),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
        assert process.stdout is not None
        seen: list[str] = []
        await asyncio.wait_for(read_until(process.stdout, "9 of 9 requests sent", seen), 60)
        await stack.emulator.wait_for(lambda e: e.held == 3)

        process.send_signal(signal.SIGINT)  # Ctrl-C: the batch is cancelled; what is in flight finishes
        await asyncio.wait_for(read_until(process.stdout, "cancelling batch", seen), 60)
        stack.emulator.release()
        rest = (await asyncio.wait_for(process.stdout.read(), 60)).decode()
        assert await process.wait() == 130, "".join(seen) + rest
        assert "run the same command again to resume" in rest
        assert len(results(output)) == 3, "the three in flight finished; nothing new started"
        assert (tmp_path / "results.jsonl.batch.json").exists()

        code = await asyncio.to_thread(run, cli_args(stack, source, output))
        assert code == 0
        assert sorted(results(output)) == [f"req-{i:04d}" for i in range(9)], "resumed, nothing twice"
        assert not (tmp_path / "results.jsonl.batch.json").exists()



async def test_batch_list_status_and_cancel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, account_extra={"concurrency": 1}) as stack:
        for key in ("sk-emu-0001", "sk-emu-0002", "sk-emu-0003"):
            stack.emulator.script(key, [{"kind": "hold_after", "chunks": 0}])
        client = stack.client()
        batch_id = await start(client, requests(6))
        await stack.emulator.wait_for(lambda e: e.held == 3)
        where = ["--url", stack.url, "--key", MASTER_KEY]
        capsys.readouterr()
        assert await asyncio.to_thread(run, ["batch", "list", "--json", *where]) == 0
        [listed] = json.loads(capsys.readouterr().out)
        assert (listed["id"], listed["status"]) == (batch_id, "in_progress")
        assert await asyncio.to_thread(run, ["batch", "status", batch_id, *where]) == 0
        assert json.loads(capsys.readouterr().out)["request_counts"]["total"] == 6
        assert await asyncio.to_thread(run, ["batch", "cancel", batch_id, *where]) == 0
        assert capsys.readouterr().out == f"batch {batch_id}: cancelling\n"
        stack.emulator.release()
        assert await asyncio.to_thread(run, ["batch", "list", *where]) == 0
        assert batch_id in capsys.readouterr().out
        assert await asyncio.to_thread(run, ["batch", "status", "batch_nope", *where]) == 1
        assert "404" in capsys.readouterr().err
