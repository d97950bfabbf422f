"""Account states written through: stored before ``saved`` returns, never over a state someone else
wrote, kept by a reload while they are still being written. A real SQLite file, the real pool and
account sync, a manual clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text

from app.accounts_config import make_account_spec
from app.api.auth import Authenticator
from app.cli import run
from app.clock import ManualClock
from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from app.errors import AuthDead, RateLimited
from app.pool.account import State
from app.pool.scheduler import Pool
from app.store.db import Database
from app.store.models import AccountRow
from app.store.repository import AccountRepository, HealthRepository
from app.store.states import StateWriter
from app.sync import AccountSync
from tests.conftest import MASTER_KEY, accounts_toml, gateway_process, serve

NOW = 1_760_000_000.0


async def settle(waiting: Awaitable[None]) -> None:
    """Await an event-driven wait; the timeout is only a safety net, so a bug fails instead of hanging."""
    async with asyncio.timeout(5):
        await waiting


@dataclass
class Server:
    db: Database
    clock: ManualClock
    pool: Pool
    states: StateWriter
    sync: AccountSync

    async def row(self, name: str) -> AccountRow:
        async with self.db.session() as session:
            return await AccountRepository(session).get(name)

    async def events(self, name: str) -> list[tuple[str, float | None]]:
        async with self.db.session() as session:
            return [(e.state, e.until) for e in reversed(await HealthRepository(session).recent(account=name))]

    def cool(self, name: str, seconds: float) -> None:
        self.pool.report(self.pool.accounts[name], RateLimited("429: wait", retry_after=seconds))


@contextlib.asynccontextmanager
async def server(db: Database, *names: str, start: bool = True) -> AsyncIterator[Server]:
    """The pool of a server on ``db`` with accounts ``names``, its state writer (started or not) and sync."""
    clock = ManualClock(NOW)
    async with db.session() as session, session.begin():
        for name in names:
            await AccountRepository(session).add(make_account_spec(name=name, kind="kimi-ai-chat"), NOW)
    pool = Pool(clock)
    states = StateWriter(db, pool, clock)
    pool.on_state_change(states.changed)
    sync = AccountSync(db, pool, Authenticator(None), clock, unsaved=states.unsaved)
    await sync.load()
    if start:
        states.start()
    try:
        yield Server(db, clock, pool, states, sync)
    finally:
        await states.close()


async def test_a_state_change_is_stored_when_saved_returns(migrated: Database) -> None:
    async with server(migrated, "a", "b") as s:
        s.cool("a", 900)
        s.pool.report(s.pool.accounts["b"], AuthDead("401: invalid key"))
        await settle(s.states.saved())  # the clock never moved: nothing waits for a flush interval
        a, b = await s.row("a"), await s.row("b")
        assert (a.state, b.state) == ("cooling_down", "auth_dead")
        assert a.state_until == NOW + 900, "the upstream's wait, in full"
        assert (a.config_rev, b.config_rev) == (1, 1), "a server's state write is no configuration change"
        assert await s.events("a") == [("cooling_down", NOW + 900)]
        assert s.states.writes == 1, "changes made together are stored in one transaction"

        s.clock.advance(900)
        assert s.pool.acquire("kimi-k2") is not None, "the cooldown ran out: the account serves again"
        await settle(s.states.saved())
        assert (await s.row("a")).state == "active"
        assert await s.events("a") == [("cooling_down", NOW + 900), ("active", None)]


async def test_a_state_written_by_someone_else_is_never_overwritten(migrated: Database,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    async with server(migrated, "a") as s:
        async with migrated.session() as session, session.begin():  # a probe: the key is dead
            await AccountRepository(session).set_runtime_state("a", "auth_dead", None, "401 (probe)", NOW)
        s.cool("a", 30)  # the server, not reloaded yet, still thinks the account was active
        with caplog.at_level(logging.INFO, logger="app.store.states"):
            await settle(s.states.saved())
        row = await s.row("a")
        assert (row.state, row.state_reason) == ("auth_dead", "401 (probe)"), "the probe's verdict stands"
        assert s.states.conflicts == 1 and "changed by someone else" in caplog.text
        assert await s.events("a") == [], "a transition that was not stored is not in the history either"

        await s.sync.load()
        assert s.pool.accounts["a"].state is State.AUTH_DEAD, "the server adopts it when it reloads"
        s.pool.report(s.pool.accounts["a"], AuthDead("401 again"))  # dead stays dead: no change, no write
        await settle(s.states.saved())
        assert (await s.row("a")).state_reason == "401 (probe)"


async def test_a_reload_keeps_a_state_that_is_still_being_written(migrated: Database) -> None:
    async with server(migrated, "a", "b", start=False) as s:  # the writer has not written yet
        s.cool("a", 60)
        s.cool("b", 60)
        async with migrated.session() as session, session.begin():
            repo = AccountRepository(session)  # the operator changes a's limits, and b's state (enable)
            await repo.upsert(make_account_spec(name="a", kind="kimi-ai-chat", rpm=10), NOW)
            await repo.set_runtime_state("b", "active", None, None, NOW)
        await s.sync.load()
        a, b = s.pool.accounts["a"], s.pool.accounts["b"]
        assert (a.spec.rpm, a.state, a.until) == (10, State.COOLING_DOWN, NOW + 60), \
            "the new limits, and the cooldown the row does not hold yet"
        assert b.state is State.ACTIVE, "an operator's newer state wins over the pool's unsaved one"

        s.states.start()
        await settle(s.states.saved())
        assert ((await s.row("a")).state, (await s.row("b")).state) == ("cooling_down", "active")
        assert s.states.conflicts == 1
        s.clock.advance(60)
        assert s.pool.acquire("kimi-k2", exclude={"b"}) is not None
        await settle(s.states.saved())
        assert (await s.row("a")).state == "active", "the reloaded account goes on writing its state"


async def test_a_failed_write_lets_requests_go_on_and_is_tried_again(migrated: Database,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    async with server(migrated, "a") as s:
        async with migrated.session() as session, session.begin():
            await session.execute(text("ALTER TABLE health_events RENAME TO health_events_away"))
        with caplog.at_level(logging.WARNING, logger="app.store.states"):
            s.cool("a", 30)
            await settle(s.states.saved())  # returns although nothing could be stored
        assert s.states.failures == 1 and "will retry" in caplog.text and "no such table" in caplog.text
        assert s.states.unsaved("a") and (await s.row("a")).state == "active"

        async with migrated.session() as session, session.begin():
            await session.execute(text("ALTER TABLE health_events_away RENAME TO health_events"))
        await settle(s.clock.wait_for_sleepers(1))  # the retry waits on the clock
        s.clock.advance(1.0)
        await settle(s.states.wait_writes(1))
        assert not s.states.unsaved("a")
        assert (await s.row("a")).state == "cooling_down"
        assert await s.events("a") == [("cooling_down", NOW + 30)]


# --- across a real SIGKILL of a real ``kimi-pool serve`` ---------------------------------------------

MODEL = "kimi-k2-0905-preview"
HELLO: Any = [{"role": "user", "content": "hello"}]


async def ask(url: str) -> str:
    """One chat completion; the account that answered."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    assert raw.parse().choices[0].message.content
    return raw.headers["x-kimi-pool-account"]


async def pool_status(url: str) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as http:
        body = (await http.get("/v1/pool/status")).raise_for_status().json()
    return {account["name"]: account for account in body["accounts"]}


@pytest.mark.parametrize("workers", [0, 2])
async def test_a_cooldown_and_a_dead_key_survive_a_sigkill_right_after_the_answer(tmp_path: Path,
                                                                                  workers: int) -> None:
    """With ``--workers 2`` the request is served by a worker, which waits for the keeper's commit."""
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=3))
    emulator = emulator_app.state.emulator
    emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 900}])
    emulator.script("sk-emu-0002", [{"kind": "auth"}])
    async with serve(emulator_app) as emulator_url:
        accounts = accounts_toml(emulator_url, ["sk-emu-0001", "sk-emu-0002", "sk-emu-0003"])
        extra, ready = (("--workers", str(workers)), f"kimi-pool ready: {workers} workers") if workers else ((), None)
        async with gateway_process(tmp_path, emulator_url, *extra, accounts=accounts,
                                   **({"ready": ready} if ready else {})) as (process, url, _log):
            assert await ask(url) == "acct-3", "acct-1 said 429 (wait 900 s), acct-2 401: the request moved on"
            killed_at = time.time()
            process.kill()  # at once: no flush, no clean shutdown
            await process.wait()

        async with gateway_process(tmp_path, emulator_url, accounts=accounts) as (_process, url, _log):
            status = await pool_status(url)
            assert status["acct-1"]["state"] == "cooling_down"
            assert status["acct-1"]["until"] >= killed_at + 250, "the cooldown (capped at 5 min) goes on"
            assert status["acct-2"]["state"] == "auth_dead"
            assert {await ask(url) for _ in range(6)} == {"acct-3"}
    keys = emulator.snapshot()["keys"]
    assert (keys["sk-emu-0001"]["requests"], keys["sk-emu-0002"]["requests"]) == (1, 1), \
        "the restarted server sent nothing to the cooling account nor to the dead one"


async def test_a_probe_s_verdict_is_not_overwritten_by_the_server(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=2))
    emulator = emulator_app.state.emulator
    emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 900}])
    db_url = f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db"
    async with serve(emulator_app) as emulator_url:
        accounts = accounts_toml(emulator_url, ["sk-emu-0001", "sk-emu-0002"])
        async with gateway_process(tmp_path, emulator_url, accounts=accounts) as (process, url, _log):
            assert await ask(url) == "acct-2"
            assert (await pool_status(url))["acct-1"]["state"] == "cooling_down"

            assert await asyncio.to_thread(run, ["--db", db_url, "accounts", "check", "acct-1"]) == 0
            assert (await pool_status(url))["acct-1"]["state"] == "active", "the server adopted it at once"
            assert {await ask(url) for _ in range(4)} == {"acct-1", "acct-2"}, "acct-1 serves again"

            process.send_signal(signal.SIGTERM)  # a clean stop writes everything the server still holds
            assert await asyncio.wait_for(process.wait(), 30) == 0
        with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
            assert db.execute("SELECT state FROM accounts WHERE name = 'acct-1'").fetchone() == ("active",)

        async with gateway_process(tmp_path, emulator_url, accounts=accounts) as (_process, url, _log):
            assert (await pool_status(url))["acct-1"]["state"] == "active"


async def test_a_sigkill_loses_the_usage_rows_of_the_last_flush_interval_only(tmp_path: Path) -> None:
    """The documented window: usage rows are written every ``--flush-interval`` seconds (1 by default),
    so a ``kill -9`` loses the rows of requests answered since the last write, and nothing else."""
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=2))
    emulator_app.state.emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 900}])
    async with serve(emulator_app) as emulator_url:
        accounts = accounts_toml(emulator_url, ["sk-emu-0001", "sk-emu-0002"])
        async with gateway_process(tmp_path, emulator_url, "--flush-interval", "3600",
                                   accounts=accounts) as (process, url, _log):
            assert [await ask(url) for _ in range(5)] == ["acct-2"] * 5, "the first one failed over"
            process.kill()
            await process.wait()
    with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
        assert db.execute("SELECT count(*) FROM usage").fetchone() == (0,), "5 answered, none written: the window"
        assert db.execute("SELECT state FROM accounts WHERE name = 'acct-1'").fetchone() == ("cooling_down",)
        assert db.execute("SELECT state FROM health_events").fetchall() == [("cooling_down",)], \
            "the account's state was written at once, with its transition"
