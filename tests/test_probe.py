"""Probing accounts against the Moonshot emulator on loopback, with the outcome in a real SQLite file.

The emulator answers ``GET /v1/users/me/balance`` but neither counts those requests nor plays its
scripts on them, so a ``Tap`` sits in front of it on the wire: it records every request it sees and,
when told, answers one in the emulator's stead (with the emulator's own error bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from app.accounts_config import make_account_spec
from app.cli import run
from app.clock import ManualClock
from app.config import Settings
from app.emulator import moonshot_wire as wire
from app.emulator.asgi import bearer_token, send_whole
from app.emulator.moonshot import MoonshotEmulator, MoonshotEmulatorConfig, create_moonshot_emulator, default_models
from app.errors import ConfigError
from app.pool.account import State
from app.probe import ProbeResult, probe_accounts
from app.store.db import Database
from app.store.models import AccountRow
from app.store.repository import AccountRepository, HealthRepository
from app.upstreams.http import create_session
from app.upstreams.registry import Registry
from tests.conftest import reload, run_stack, serve

BALANCE = "/v1/users/me/balance"
MODELS = "/v1/models"
GOOD, GOOD2, GOOD3 = "sk-emu-0001", "sk-emu-0002", "sk-emu-0003"
NEVER_ISSUED = "sk-never-issued-0123456789"


class Tap:
    """In front of an ASGI app: records (method, path, bearer key) of every request, and answers
    the next request of a key with a queued (status, body) instead of the app."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self.seen: list[tuple[str, str, str | None]] = []
        self._answers: dict[str, list[tuple[int, bytes]]] = {}

    def answer(self, key: str, status: int, body: bytes) -> None:
        self._answers.setdefault(key, []).append((status, body))

    def per_key(self) -> Counter[str | None]:
        return Counter(key for _, _, key in self.seen)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            key = bearer_token(scope)
            self.seen.append((scope["method"], scope["path"], key))
            queued = self._answers.get(key or "")
            if queued:
                status, body = queued.pop(0)
                await send_whole(send, status, wire.JSON_HEADERS, body)
                return
        await self._app(scope, receive, send)


@dataclass
class Env:
    url: str
    tap: Tap
    emulator: MoonshotEmulator
    db: Database
    registry: Registry
    clock: ManualClock

    async def add(self, name: str, key: str, *, state: str = "active", until: float | None = None,
                  reason: str | None = None, kind: str = "moonshot", base_url: str | None = None,
                  proxy: str | None = None) -> None:
        spec = make_account_spec(name=name, kind=kind, secret=key, base_url=base_url or self.url + "/v1",
                                 proxy=proxy)
        async with self.db.session() as session, session.begin():
            repo = AccountRepository(session)
            await repo.add(spec, self.clock.time())
            if state != "active":
                await repo.save_state(name, state, until, reason)

    async def probe(self, names: list[str] | None = None) -> dict[str, ProbeResult]:
        return {r.name: r for r in await probe_accounts(self.db, self.registry, self.clock, names)}

    async def row(self, name: str) -> AccountRow:
        async with self.db.session() as session:
            return await AccountRepository(session).get(name)

    def untouched(self) -> None:
        """No chat request reached the emulator: probing spent nothing."""
        snapshot = self.emulator.snapshot()
        assert snapshot["totals"]["requests"] == 0 and snapshot["totals"]["tokens_used"] == 0


@contextlib.asynccontextmanager
async def environment(tmp_path: Path, config: MoonshotEmulatorConfig | None = None) -> AsyncIterator[Env]:
    clock = ManualClock()
    emulator_app = create_moonshot_emulator(config or MoonshotEmulatorConfig.simple(3), clock=clock)
    tap = Tap(emulator_app)
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db")
    await db.upgrade()
    try:
        async with serve(tap) as url, create_session(Settings(db_url=db.url)) as session:
            registry = Registry.default(session, clock)
            yield Env(url, tap, emulator_app.state.emulator, db, registry, clock)
            await registry.close()
    finally:
        await db.dispose()


# --- outcomes -------------------------------------------------------------------------------------


async def test_a_working_key_brings_a_cooling_or_exhausted_account_back(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        now = env.clock.time()
        await env.add("fresh", GOOD)
        await env.add("cooling", GOOD2, state="cooling_down", until=now + 300, reason="429 burst")
        await env.add("broke", GOOD3, state="quota_exhausted", reason="out of credit")
        results = await env.probe()
        assert [(r.before, r.after, r.outcome) for r in results.values()] == [
            ("active", "active", "ok"), ("cooling_down", "active", "ok"), ("quota_exhausted", "active", "ok")]
        for name in results:
            row = await env.row(name)
            assert (row.state, row.state_until, row.state_reason, row.config_rev) == ("active", None, None, 2)
            assert row.discovered_models == list(default_models()), "a working account is asked its models too"
            assert results[name].models == row.discovered_models
        assert results["fresh"].detail == f"ok; serves {len(default_models())} model(s)"
        assert sorted(env.tap.seen) == sorted(("GET", path, key) for key in (GOOD, GOOD2, GOOD3)
                                              for path in (BALANCE, MODELS))
        env.untouched()


async def test_a_rejected_key_is_auth_dead_with_the_reason(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        await env.add("good", GOOD)
        await env.add("revoked", NEVER_ISSUED)
        results = await env.probe()
        dead = results["revoked"]
        assert (dead.before, dead.after, dead.outcome) == ("active", "auth_dead", "failed")
        assert "rejected the API key" in dead.detail and NEVER_ISSUED not in dead.detail
        row = await env.row("revoked")
        assert (row.state, row.state_reason, row.config_rev) == ("auth_dead", dead.detail, 2)
        assert results["good"].outcome == "ok"
        async with env.db.session() as session:
            [event] = await HealthRepository(session).recent(account="revoked")
        assert (event.state, event.reason) == ("auth_dead", dead.detail)
        assert env.tap.per_key() == {GOOD: 2, NEVER_ISSUED: 1}, "a dead key is not asked its models"


async def test_an_empty_balance_is_quota_exhausted(tmp_path: Path) -> None:
    async with environment(tmp_path, MoonshotEmulatorConfig.simple(2, balance=0)) as env:
        env.emulator.configure({"orgs": {"org-0002": {"balance": -3.5}}})
        await env.add("zero", GOOD)
        await env.add("arrears", GOOD2)
        results = await env.probe()
        assert results["zero"].after == results["arrears"].after == "quota_exhausted"
        assert results["zero"].detail == "out of credit: balance 0"
        assert results["arrears"].detail == "out of credit: balance -3.5"
        row = await env.row("arrears")
        assert (row.state, row.state_until, row.config_rev) == ("quota_exhausted", None, 2)

        env.emulator.configure({"orgs": {"org-0001": {"balance": 50}}})  # topped up
        assert (await env.probe(["zero"]))["zero"].after == "active"
        assert (await env.row("zero")).config_rev == 3


async def test_a_rate_limited_probe_cools_the_account_for_the_wait_it_names(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        await env.add("busy", GOOD)
        message = wire.rate_limit_message("org-0001<ak-x>", "rpm", 3, 3, 7)
        env.tap.answer(GOOD, 429, wire.error_body("rate_limit_reached_error", message))
        [result] = (await env.probe()).values()
        assert (result.after, result.outcome) == ("cooling_down", "failed")
        row = await env.row("busy")
        assert (row.state, row.state_until) == ("cooling_down", env.clock.time() + 7)


async def test_a_server_error_leaves_the_state_alone_and_is_reported(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        until = env.clock.time() + 120
        await env.add("cooling", GOOD, state="cooling_down", until=until, reason="429 burst")
        await env.add("fine", GOOD2)
        env.tap.answer(GOOD, 500, wire.error_body("server_error", wire.SERVER_ERROR))
        env.tap.answer(GOOD2, 500, wire.error_body("server_error", wire.SERVER_ERROR))
        results = await env.probe()
        for name, before in (("cooling", "cooling_down"), ("fine", "active")):
            result = results[name]
            assert (result.before, result.after, result.outcome) == (before, before, "failed")
            assert "HTTP 500" in result.detail and "left as it was" in result.detail
        row = await env.row("cooling")
        assert (row.state, row.state_until, row.state_reason, row.config_rev) == \
            ("cooling_down", until, "429 burst", 1)
        assert env.tap.per_key() == {GOOD: 1, GOOD2: 1}, "one request each, no retry"


async def test_an_unreachable_upstream_leaves_the_state_alone(tmp_path: Path) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        async with environment(tmp_path) as env:
            await env.add("gone", GOOD, base_url=f"http://127.0.0.1:{port}/v1")
            [result] = (await env.probe()).values()
            assert (result.after, result.outcome) == ("active", "failed")
            assert "unreachable" in result.detail
            assert (await env.row("gone")).config_rev == 1


async def test_the_probe_goes_through_the_accounts_proxy(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        # The upstream's name does not resolve: only the proxy (the emulator, answering the
        # absolute-form request) can have answered.
        await env.add("proxied", GOOD, base_url="http://upstream.invalid/v1", proxy=env.url)
        [result] = (await env.probe()).values()
        assert result.outcome == "ok", result.detail
        assert env.tap.seen == [("GET", BALANCE, GOOD), ("GET", MODELS, GOOD)]


# --- which accounts -------------------------------------------------------------------------------


async def test_disabled_accounts_are_probed_only_by_name_and_stay_disabled(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        await env.add("on", GOOD)
        await env.add("off", GOOD2, state="auth_dead", reason="401")
        async with env.db.session() as session, session.begin():
            await AccountRepository(session).set_enabled("off", False, "rotating key", env.clock.time())
        assert set(await env.probe()) == {"on"}
        assert env.tap.per_key() == {GOOD: 2}

        [result] = (await env.probe(["off", "off"])).values()
        assert (result.before, result.after, result.outcome) == ("auth_dead", "active", "ok")
        assert "stays disabled (rotating key)" in result.detail
        row = await env.row("off")
        assert (row.enabled, row.state, row.disabled_reason) == (False, "active", "rotating key")
        assert env.tap.per_key() == {GOOD: 2, GOOD2: 2}


async def test_unknown_names_fail_before_anything_is_sent(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        await env.add("one", GOOD)
        with pytest.raises(ConfigError, match="no account named nope"):
            await env.probe(["one", "nope"])
        assert env.tap.seen == []


async def test_secret_references_are_resolved_and_never_shown(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KP_PROBE_KEY", GOOD)
    monkeypatch.delenv("KP_PROBE_UNSET", raising=False)
    async with environment(tmp_path) as env:
        await env.add("by-ref", "env:KP_PROBE_KEY")
        await env.add("unset", "env:KP_PROBE_UNSET", state="auth_dead", reason="401")
        results = await env.probe()
        assert results["by-ref"].outcome == "ok"
        unset = results["unset"]
        assert (unset.after, unset.outcome) == ("auth_dead", "failed") and "not probed" in unset.detail
        assert (await env.row("unset")).config_rev == 1, "the CLI's environment is not the server's: judge nothing"
        assert env.tap.seen == [("GET", BALANCE, GOOD), ("GET", MODELS, GOOD)]
        assert GOOD not in repr(results)


# --- through a running gateway --------------------------------------------------------------------

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]


async def test_a_dead_account_rejoins_the_pool_after_a_successful_check(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "auth"}])  # a passing 401 marks acct-1 dead
        for _ in range(3):
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert stack.gateway.pool.accounts["acct-1"].state is State.AUTH_DEAD
        await stack.app.state.writer.flush()  # the server has recorded it
        db = Database(stack.db_url)
        async with db.session() as session:
            assert (await AccountRepository(session).get("acct-1")).state == "auth_dead"
        await db.dispose()

        code = await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "check", "acct-1"])
        assert code == 0
        await reload(stack)
        assert stack.gateway.pool.accounts["acct-1"].state is State.ACTIVE
        served = stack.emulator.snapshot()["keys"]["sk-emu-0001"]["requests"]
        for _ in range(3):
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert stack.emulator.snapshot()["keys"]["sk-emu-0001"]["requests"] == served + 1
