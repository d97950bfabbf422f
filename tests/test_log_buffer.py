"""Requests' log lines are written in batches, off the request path: none is lost at a clean shutdown,
and other lines keep their order among them."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import signal
from pathlib import Path

import openai
import pytest

from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from app.log_buffer import BufferedHandler, TextFormatter
from app.logs import AccessLog, Fields
from app.serve import TEXT_FORMAT
from app.store.records import UsageRecord
from tests.conftest import MASTER_KEY, gateway_process, serve

MODEL = "kimi-k2-0905-preview"


@pytest.mark.parametrize("workers", [1, 2])
async def test_every_access_line_reaches_the_log_at_a_clean_shutdown(tmp_path: Path, workers: int) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    ready = "Application startup complete" if workers == 1 else f"kimi-pool ready: {workers} workers"
    async with serve(emulator_app) as emulator_url, gateway_process(
            tmp_path, emulator_url, "--workers", str(workers), ready=ready) as (process, url, log):
        assert process.stderr is not None
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
            await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-Id": f"r-{n}"})
                for n in range(40)))
        process.send_signal(signal.SIGTERM)  # at once: the last lines are still queued
        rest = (await asyncio.wait_for(process.stderr.read(), 60)).decode(errors="replace")
        assert await process.wait() == 0
    text = "".join(log) + rest
    logged = re.findall(r"kimi_pool\.access: request_id=(r-\d+) .* status=200 ", text)
    assert sorted(logged) == sorted(f"r-{n}" for n in range(40)), "each request's line, once"


async def test_a_warning_is_written_at_once_after_the_lines_queued_before_it() -> None:
    stream = io.StringIO()
    handler = BufferedHandler(stream)
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    logger = logging.getLogger("test.log_buffer")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        access = AccessLog(logger, logger)
        for n in range(3):
            access.finished(UsageRecord(ts=0.0, request_id=f"q-{n}", account="a", client_key=None, model=MODEL,
                                        status=200, outcome="ok"), 0.0, None)
        assert stream.getvalue() == "", "a request only queues what its line will say"
        access.flush()  # what its timer does (and the lifespan at shutdown): the handler queues the lines
        assert stream.getvalue() == ""
        logger.warning("account a is auth_dead")
        lines = stream.getvalue().splitlines()
        assert [line.split(": ", 1)[1].split(" ")[0] for line in lines] == [
            "request_id=q-0", "request_id=q-1", "request_id=q-2", "account"]
        assert lines[-1].endswith("WARNING test.log_buffer: account a is auth_dead")

        logger.info(Fields(request_id="later"))
        assert "later" not in stream.getvalue()
        await asyncio.sleep(0)  # one round of the event loop writes what it queued: no wait for time
        assert stream.getvalue().splitlines()[-1].endswith("INFO test.log_buffer: request_id=later")
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_the_text_lines_are_those_of_the_standard_formatter() -> None:
    record = logging.makeLogRecord({"name": "kimi_pool.access", "levelno": logging.INFO, "levelname": "INFO",
                                    "msg": Fields(request_id="x", status=200), "created": 1_790_000_000.25,
                                    "msecs": 250.0})
    assert TextFormatter(TEXT_FORMAT).format(record) == logging.Formatter(TEXT_FORMAT).format(record)
