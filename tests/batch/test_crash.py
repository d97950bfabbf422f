"""SIGKILL in the middle of a batch: a new server on the same database finishes it, nothing lost or run twice.

A real ``kimi-pool serve`` child against an in-test emulator (on the system clock): the emulator
answers some requests and holds the others; the server is killed while they are held, a new one is
started on the same database, and the batch is followed to its end through the server's log.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import openai

from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.batch.support import read_lines, requests, start
from tests.conftest import MASTER_KEY, gateway_process, read_until, serve


def items(tmp_path: Path) -> dict[str, int]:
    with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
        return dict(db.execute("SELECT state, count(*) FROM batch_items GROUP BY state").fetchall())


async def test_a_batch_survives_sigkill_and_no_stored_result_runs_again(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    emulator = emulator_app.state.emulator
    emulator.script(None, [{"kind": "ok"}] * 5 + [{"kind": "hold_after", "chunks": 0}] * 15)
    async with serve(emulator_app) as emulator_url:
        async with gateway_process(tmp_path, emulator_url) as (process, url, _log):
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0)
            batch_id = await start(client, requests(20))
            await emulator.wait_for(lambda e: e.held == 15 and e.stats.totals.completed == 5, timeout=30)
            while (await client.batches.retrieve(batch_id)).request_counts.completed < 5:  # type: ignore[union-attr]
                pass  # each retrieve is a round trip: the 5 answers are being committed
            process.kill()
            await process.wait()
            await client.close()
        assert items(tmp_path) == {"done": 5, "pending": 15}, "the 15 in flight left no trace"
        await emulator.wait_for(lambda e: e.held == 0)  # the dead server's connections are gone

        async with gateway_process(tmp_path, emulator_url) as (process, url, log):
            assert process.stderr is not None
            await asyncio.wait_for(read_until(process.stderr, f"batch {batch_id} finished", log), 60)
            assert "finished: completed; 20 of 20 completed, 0 failed" in log[-1]
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0)
            batch = await client.batches.retrieve(batch_id)
            assert batch.status == "completed"
            output = await read_lines(client, batch.output_file_id)
            await client.close()
    assert [line["custom_id"] for line in output] == [f"req-{i:04d}" for i in range(20)], "each once, none lost"
    totals = emulator.snapshot()["totals"]
    assert totals["requests"] == 5 + 15 + 15, "only the 15 cut off by the kill were sent again"
    assert totals["completed"] == 20


async def test_sigterm_stores_what_was_answered_and_leaves_the_rest_for_the_next_start(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    emulator = emulator_app.state.emulator
    emulator.script(None, [{"kind": "ok"}] * 3 + [{"kind": "hold_after", "chunks": 0}] * 7)
    async with serve(emulator_app) as emulator_url, gateway_process(tmp_path, emulator_url) as (process, url, log):
        assert process.stderr is not None
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0)
        batch_id = await start(client, requests(10))
        await emulator.wait_for(lambda e: e.held == 7 and e.stats.totals.completed == 3, timeout=30)
        while (await client.batches.retrieve(batch_id)).request_counts.completed < 3:  # type: ignore[union-attr]
            pass
        await client.close()
        process.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode(errors="replace")
        assert await process.wait() == 0, "".join(log) + rest
        assert "Traceback" not in rest
    assert items(tmp_path) == {"done": 3, "pending": 7}
    with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
        assert db.execute("SELECT status, completed FROM batches WHERE id = ?", (batch_id,)).fetchone() == (
            "in_progress", 3)
