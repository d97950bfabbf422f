"""The log says when an account stops serving (WARNING, with the upstream's reason, redacted) and when it is
back (INFO): once per change, never per request, and not for a cooldown a minute fixes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from app.account_log import AccountLog
from app.accounts_config import make_account_spec
from app.clock import ManualClock
from app.emulator.moonshot import MoonshotEmulatorConfig
from app.errors import AuthDead, QuotaExhausted, RateLimited
from app.pool.account import Account
from app.pool.scheduler import Pool
from app.when import utc
from tests.conftest import run_stack

MODEL = "kimi-k2-0905-preview"
HELLO: Any = [{"role": "user", "content": "hello"}]


def said(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "kimi_pool.accounts"]


async def test_a_dead_or_long_cooling_account_is_warned_of_once_and_its_return_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kimi_pool.accounts")
    async with run_stack(tmp_path, emulator=MoonshotEmulatorConfig.simple(keys=4)) as stack:
        leaked = "sk-emu-0001-and-then-some"
        stack.emulator.script("sk-emu-0001", [{"kind": "status", "status": 401, "type": "invalid_authentication_error",
                                               "message": f"Invalid Authentication: {leaked}"}])
        stack.emulator.script("sk-emu-0002", [{"kind": "rate_limit", "wait": 150}])
        stack.emulator.script("sk-emu-0003", [{"kind": "rate_limit", "wait": 5}])
        client = stack.client()
        for _ in range(12):  # acct-1 dies, acct-2 cools for 150 s, acct-3 for 5 s; acct-4 serves every request
            assert (await client.chat.completions.create(model=MODEL, messages=HELLO)).choices
        assert said(caplog) == [
            ("WARNING", "account acct-1 is out of service: its credential was refused (Moonshot rejected the API key: "
                        "Invalid Authentication: sk-[REDACTED]); fix it and enable it again (kimi-pool accounts "
                        "enable)"),
            ("WARNING", f"account acct-2 is cooling down for 2m30s (until {utc(stack.clock.time() + 150)}): "
                        f"{stack.gateway.pool.accounts['acct-2'].reason}"),
        ], "one line each, none for acct-3's short cooldown, none per request"
        assert leaked not in caplog.text

        stack.clock.advance(151)
        for _ in range(6):
            assert (await client.chat.completions.create(model=MODEL, messages=HELLO)).choices
        assert said(caplog)[2:] == [("INFO", "account acct-2 is back in service (it was cooling_down)")]
        assert stack.gateway.pool.accounts["acct-1"].state == "auth_dead"


def test_the_same_state_again_says_nothing_new_and_quota_has_its_own_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kimi_pool.accounts")
    clock = ManualClock()
    pool = Pool(clock)
    pool.on_state_change(AccountLog(clock))
    account = Account(make_account_spec(name="a", kind="moonshot", secret="sk-test-0123456789"), "sk-test-0123456789")
    pool.put(account)
    pool.report(account, RateLimited("slow down", retry_after=90))
    pool.report(account, RateLimited("slow down", retry_after=90))  # a second 429 from a request in flight
    pool.report(account, QuotaExhausted("out of credit"))
    pool.report(account, QuotaExhausted("still out of credit"))
    pool.report(account, AuthDead("key revoked"))
    assert said(caplog) == [
        ("WARNING", f"account a is cooling down for 1m30s (until {utc(clock.time() + 90)}): slow down"),
        ("WARNING", "account a is out of quota until an operator enables it again: out of credit"),
        ("WARNING", "account a is out of service: its credential was refused (key revoked); fix it and enable it "
                    "again (kimi-pool accounts enable)"),
    ]
