"""``/admin/accounts`` for what the operator changes in place: learned limits forgotten, a key replaced, an account
added, each serving (with the models its upstream lists) when the response arrives, no sync tick waited for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.emulator.moonshot import MoonshotEmulatorConfig, default_models
from app.pool.account import State
from tests.api.test_errors import assert_error
from tests.conftest import MASTER_KEY, Stack, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """Emulator keys sk-emu-0001…0003; the pool has acct-1 (0001) and acct-2 (0002)."""
    async with run_stack(tmp_path, keys=["sk-emu-0001", "sk-emu-0002"],
                         emulator=MoonshotEmulatorConfig.simple(3)) as stack:
        yield stack


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    async with httpx.AsyncClient(base_url=stack.url + "/admin", headers=headers, timeout=10) as client:
        yield client


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


async def served_by(stack: Stack) -> str:
    raw = await stack.client().chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    return raw.headers["x-kimi-pool-account"]


async def test_reset_limits_forgets_a_learned_limit_at_once(stack: Stack, admin: httpx.AsyncClient) -> None:
    stack.emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 1}])
    assert await served_by(stack) == "acct-2"  # acct-1 answered 429 "max RPM: 3"
    view = ok(await admin.get("/accounts/acct-1"))
    assert (view["rpm"], view["effective_limits"]["rpm"]) == (None, 3)
    assert view["learned_limits"] == {"rpm": {"limit": 3, "at": stack.clock.time()}}

    reset = ok(await admin.post("/accounts/acct-1/reset-limits"))
    assert reset["forgotten"] == {"rpm": {"limit": 3, "at": stack.clock.time()}}
    assert (reset["effective_limits"]["rpm"], reset["learned_limits"]) == (None, {})
    assert stack.gateway.pool.accounts["acct-1"].limits.effective["rpm"] is None, "no sync tick waited for"
    again = ok(await admin.post("/accounts/acct-1/reset-limits"))
    assert again["forgotten"] == {}
    assert_error(await admin.post("/accounts/nope/reset-limits"), 404, "invalid_request_error", code="not_found")
    assert_error(await admin.post("/accounts/acct-1/reset-limits", json={"all": True}), 400,
                 "invalid_request_error", param="all")


async def test_a_new_key_revives_a_dead_account_with_its_upstreams_models(stack: Stack,
                                                                          admin: httpx.AsyncClient) -> None:
    stack.emulator.script("sk-emu-0001", [{"kind": "auth"}])
    assert await served_by(stack) == "acct-2"
    assert ok(await admin.get("/accounts/acct-1"))["state"] == "auth_dead"
    stack.emulator.configure({"models": ["kimi-k3", MODEL]})

    patched = ok(await admin.patch("/accounts/acct-1", json={"api_key": "sk-emu-0003"}))
    assert (patched["state"], patched["models_source"], patched["serves"]) == ("active", "upstream", ["kimi-k3", MODEL])
    assert "discovery_error" not in patched
    assert stack.gateway.pool.accounts["acct-1"].state is State.ACTIVE
    assert stack.gateway.pool.accounts["acct-1"].models == {"kimi-k3", MODEL, "kimi-k2"}, "kimi-k2: its alias"
    assert {await served_by(stack) for _ in range(2)} == {"acct-1", "acct-2"}

    limits = ok(await admin.patch("/accounts/acct-2", json={"rpm": 100}))
    assert limits["serves"] == list(default_models()), "a limit changed: the upstream is not asked again"


async def test_an_added_account_serves_what_its_upstream_lists(stack: Stack, admin: httpx.AsyncClient) -> None:
    added = ok(await admin.post("/accounts", json={"name": "acct-3", "kind": "moonshot", "api_key": "sk-emu-0003",
                                                  "base_url": stack.emulator_url + "/v1"}), 201)
    assert (added["models_source"], added["discovered_models"]) == ("upstream", list(default_models()))
    assert added["models_checked_at"] == stack.clock.time()
    assert "kimi-k2-thinking-turbo" in stack.gateway.pool.accounts["acct-3"].models

    own = ok(await admin.post("/accounts", json={"name": "acct-4", "kind": "moonshot", "api_key": "sk-emu-0003",
                                                "base_url": stack.emulator_url + "/v1", "models": ["kimi-k3"]}), 201)
    assert (own["models_source"], own["serves"], own["discovered_models"]) == ("configured", ["kimi-k3"], None)
