"""``kimi-pool usage``: the report of what a real gateway recorded, time windows and grouping on rows
written directly, and one line per mistake."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from app.cli import run
from app.clock import ManualClock
from app.store.db import Database
from app.store.records import UsageRecord
from app.store.usage import UsageRepository
from tests.cli.test_main import Cli
from tests.conftest import Stack, reload, run_stack

MODEL_A = "kimi-k2-0905-preview"
MODEL_B = "kimi-k2.5"
HELLO = [{"role": "user", "content": "hello"}]
HOUR = 3600.0


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


# --- through a real gateway -----------------------------------------------------------------------


class Seen:
    """What the clients were told, to compare with what the gateway recorded."""

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0

    async def ask(self, client: openai.AsyncOpenAI, model: str, *, stream: bool = False, **kw: Any) -> None:
        if not stream:
            completion = await client.chat.completions.create(model=model, messages=HELLO, **kw)
            usage = completion.usage
        else:
            chunks = await client.chat.completions.create(model=model, messages=HELLO, stream=True,
                                                          stream_options={"include_usage": True}, **kw)
            usage = [chunk async for chunk in chunks][-1].usage
        assert usage is not None and usage.completion_tokens > 0
        self.prompt += usage.prompt_tokens
        self.completion += usage.completion_tokens


async def report(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    code = await asyncio.to_thread(run, ["--db", stack.db_url, "usage", *args])
    out, err = capsys.readouterr()
    assert (code, err) == (0, ""), err
    return out


async def report_json(stack: Stack, capsys: pytest.CaptureFixture[str], by: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await report(stack, capsys, "--by", by, "--json"))
    assert data["by"] == by
    return data


async def test_the_report_counts_what_the_gateway_served(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the gateway's clock is a minute behind the CLI's real one, so the default window (the last 24 h) holds it all
    async with run_stack(tmp_path, clock=ManualClock(time.time() - 60)) as stack:
        assert await asyncio.to_thread(run, ["--db", stack.db_url, "keys", "create", "alice"]) == 0
        match = re.search(r"kp-[A-Za-z0-9_-]{20,}", capsys.readouterr().out)
        assert match is not None
        await reload(stack)
        master, alice, seen = stack.client(), stack.client(match.group(0)), Seen()
        for i in range(7):
            await seen.ask(master, MODEL_A, stream=i >= 4)
        for i in range(4):
            await seen.ask(alice, MODEL_B, stream=i >= 2)
        stack.emulator.script(None, [{"kind": "status", "status": 400, "type": "invalid_request_error",
                                      "message": "Invalid request: temperature out of range"}])
        with pytest.raises(openai.BadRequestError):
            await seen.ask(alice, MODEL_B)
        stack.emulator.script(None, [{"kind": "rate_limit", "bucket": "rpm", "wait": 30}] * 3)
        with pytest.raises(openai.RateLimitError):  # every account tried and refused: recorded on the last one
            await seen.ask(master, MODEL_A)
        with pytest.raises(openai.RateLimitError):  # all cooling, no wait allowed: refused before any account
            await seen.ask(master, MODEL_A, extra_headers={"X-Kimi-Pool-Max-Wait": "0"})
        await stack.app.state.writer.flush()

        expected_total = {"requests": 14, "ok": 11, "errors": 3, "prompt_tokens": seen.prompt,
                          "completion_tokens": seen.completion, "total_tokens": seen.prompt + seen.completion,
                          "streams": 5}
        by_account = await report_json(stack, capsys, "account")
        by_key = await report_json(stack, capsys, "key")
        by_model = await report_json(stack, capsys, "model")
        by_day = await report_json(stack, capsys, "day")
        for data in (by_account, by_key, by_model, by_day):
            total = data["total"]
            assert {k: v for k, v in total.items() if k != "avg_latency_ms"} == expected_total
            assert total["avg_latency_ms"] > 0
            assert data["since"] < stack.clock.time() < data["until"]
            assert data["until"] - data["since"] == pytest.approx(24 * HOUR)
            for name in expected_total:
                assert sum(row[name] for row in data["rows"]) == total[name], (data["by"], name)

        accounts = {row["account"]: row for row in by_account["rows"]}
        assert set(accounts) <= {"acct-1", "acct-2", "acct-3", None}
        unassigned = accounts[None]
        assert (unassigned["requests"], unassigned["ok"], unassigned["total_tokens"]) == (1, 0, 0)

        keys = {row["key"]: row for row in by_key["rows"]}
        assert [row["key"] for row in by_key["rows"]] == ["master", "alice"]  # busiest first
        assert (keys["master"]["requests"], keys["master"]["ok"], keys["master"]["streams"]) == (9, 7, 3)
        assert (keys["alice"]["requests"], keys["alice"]["ok"], keys["alice"]["streams"]) == (5, 4, 2)

        models = {row["model"]: (row["requests"], row["errors"]) for row in by_model["rows"]}
        assert models == {MODEL_A: (9, 2), MODEL_B: (5, 1)}

        day = dt.datetime.fromtimestamp(stack.clock.time(), dt.UTC).date().isoformat()
        assert [row["day"] for row in by_day["rows"]] == [day]

        table = await report(stack, capsys, "--by", "key")
        assert "usage in the last 24h, by key" in table
        assert row_of(table, "(master)")[:3] == ["9", "7", "2"]
        assert row_of(table, "alice")[:3] == ["5", "4", "1"]
        assert row_of(table, "total") == ["14", "11", "3", f"{seen.prompt:,}", f"{seen.completion:,}",
                                          f"{seen.prompt + seen.completion:,}", row_of(table, "total")[6], "5"]
        assert row_of(await report(stack, capsys), "-")[:3] == ["1", "0", "1"]


def row_of(table: str, label: str) -> list[str]:
    """The cells after ``label`` in the table's line that starts with it."""
    for line in table.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line)[1:-1]]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no line {label!r} in\n{table}")


# --- windows and grouping, on rows written directly -----------------------------------------------


def record(ts: float, *, account: str | None = "a", key: str | None = "batch", model: str = MODEL_A,
           status: int = 200, stream: bool = False, prompt: int = 10, completion: int = 5,
           latency: float = 100.0) -> UsageRecord:
    return UsageRecord(ts=ts, request_id=f"req-{ts}", account=account, client_key=key, model=model, status=status,
                       outcome="ok" if status == 200 else "error", stream=stream, prompt_tokens=prompt,
                       completion_tokens=completion, latency_ms=latency)


def store(cli: Cli, *records: UsageRecord) -> None:
    async def write() -> None:
        cli.path.parent.mkdir(parents=True, exist_ok=True)
        db = Database(cli.url)
        try:
            await db.upgrade()
            async with db.session() as session, session.begin():
                await UsageRepository(session).add_many(records)
        finally:
            await db.dispose()

    asyncio.run(write())


def utc(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def test_since_leaves_out_older_requests(cli: Cli) -> None:
    now = time.time()
    store(cli, record(now - 2 * HOUR, prompt=1000), record(now - 30 * 60, account="b"), record(now - 60, latency=300))
    data = json.loads(cli.ok("usage", "--since", "1h", "--json"))
    assert data["rows"] == [
        {"account": "a", "requests": 1, "ok": 1, "errors": 0, "prompt_tokens": 10, "completion_tokens": 5,
         "total_tokens": 15, "avg_latency_ms": 300.0, "streams": 0},
        {"account": "b", "requests": 1, "ok": 1, "errors": 0, "prompt_tokens": 10, "completion_tokens": 5,
         "total_tokens": 15, "avg_latency_ms": 100.0, "streams": 0},
    ]
    assert data["total"]["requests"] == 2 and data["total"]["avg_latency_ms"] == 200.0
    assert json.loads(cli.ok("usage", "--json"))["total"]["prompt_tokens"] == 1020  # the default: 24 h
    assert json.loads(cli.ok("usage", "--since", "2w", "--until", "1h", "--json"))["total"]["requests"] == 1
    everything = json.loads(cli.ok("usage", "--since", "100000000w", "--json"))  # longer ago than the epoch
    assert (everything["since"], everything["total"]["requests"]) == (0, 3)
    assert row_of(cli.ok("usage", "--since", "100000000w"), "total")[0] == "3"
    assert cli.ok("usage", "--since", "30s", "--by", "model") == "no requests recorded in the last 30s\n"


def test_days_are_split_at_midnight_utc(cli: Cli) -> None:
    store(cli, record(utc("2026-11-01T23:59:59"), stream=True), record(utc("2026-11-02T00:00:00"), status=429),
          record(utc("2026-11-02T12:00:00")), record(utc("2026-11-03T00:00:00")), record(utc("2026-10-31T23:59:00")))
    data = json.loads(cli.ok("usage", "--since", "2026-11-01", "--until", "2026-11-03", "--by", "day", "--json"))
    assert data["since"] == utc("2026-11-01T00:00:00") and data["until"] == utc("2026-11-03T00:00:00")
    assert [(row["day"], row["requests"], row["errors"], row["streams"]) for row in data["rows"]] == [
        ("2026-11-01", 1, 0, 1), ("2026-11-02", 2, 1, 0)]
    table = cli.ok("usage", "--since", "2026-11-01", "--until", "2026-11-03", "--by", "day")
    assert "from 2026-11-01 00:00 UTC to 2026-11-03 00:00 UTC" in table and "day (UTC)" in table
    assert row_of(table, "2026-11-01")[:3] == ["1", "1", "0"] and row_of(table, "2026-11-02")[:3] == ["2", "1", "1"]
    assert row_of(table, "total") == ["3", "2", "1", "30", "15", "45", "100.0", "1"]
    shifted = json.loads(cli.ok("usage", "--since", "2026-11-01T00:00:00+08:00", "--until", "2026-11-02T09:00+08:00",
                                "--by", "day", "--json"))
    assert [(row["day"], row["requests"]) for row in shifted["rows"]] == [("2026-10-31", 1), ("2026-11-01", 1),
                                                                           ("2026-11-02", 1)]


def test_keys_models_and_requests_without_an_account(cli: Cli) -> None:
    now = time.time()
    store(cli, record(now - 60, key="master"), record(now - 50, key=None, model=MODEL_B),
          record(now - 40, account=None, status=429, prompt=0, completion=0),
          record(now - 30, key="master", model=MODEL_B, prompt=7, completion=3))
    keys = {row["key"]: row["requests"] for row in json.loads(cli.ok("usage", "--by", "key", "--json"))["rows"]}
    assert keys == {"master": 2, "batch": 1, None: 1}
    table = cli.ok("usage", "--by", "key")
    assert row_of(table, "(master)")[0] == "2" and row_of(table, "(no key)")[0] == "1"
    assert row_of(cli.ok("usage"), "-")[:3] == ["1", "0", "1"]
    models = json.loads(cli.ok("usage", "--by", "model", "--json"))["rows"]
    assert [(row["model"], row["requests"], row["total_tokens"]) for row in models] == [(MODEL_A, 2, 15),
                                                                                         (MODEL_B, 2, 25)]


def test_no_usage_yet_is_one_friendly_line(cli: Cli) -> None:
    assert cli.ok("usage") == "no requests recorded in the last 24h\n"
    assert cli.ok("usage", "--since", "2026-11-01", "--until", "2026-11-02") == (
        "no requests recorded from 2026-11-01 00:00 UTC to 2026-11-02 00:00 UTC\n")
    data = json.loads(cli.ok("usage", "--by", "day", "--json"))
    assert (data["by"], data["rows"], data["total"]["requests"]) == ("day", [], 0)


# --- one line per mistake -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "yesterday", "7", "-1h", "1y", "2026-13-01", "1h30m"])
@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_bad_time_is_one_line_exit_1(cli: Cli, option: str, value: str) -> None:
    line = cli.fails("usage", option, value)
    assert line.startswith(f"bad {option} {value!r}") and "24h" in line and "2026-11-01" in line


def test_since_after_until_is_one_line_exit_1(cli: Cli) -> None:
    assert "must be before --until" in cli.fails("usage", "--since", "1h", "--until", "2h")
    assert "must be before --until" in cli.fails("usage", "--since", "2026-11-02", "--until", "2026-11-01")


@pytest.mark.parametrize("value", ["hour", "Account", ""])
def test_a_bad_grouping_is_a_usage_error_exit_2(cli: Cli, value: str) -> None:
    line = cli.fails("usage", "--by", value, code=2)
    assert "--by" in line and "'account', 'key', 'model', 'day'" in line


def test_help_says_days_are_utc(cli: Cli) -> None:
    out = " ".join(cli.ok("usage", "--help").split())
    assert "Report the requests served" in out and "days are UTC" in out and "--since" in out


def test_the_master_key_name_is_reserved_for_client_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(tmp_path, capsys)
    assert "the key name 'master' is reserved" in cli.fails("keys", "create", "master")
