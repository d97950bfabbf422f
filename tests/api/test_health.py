"""``/healthz`` answers while the process lives; ``/readyz`` is 200 only while some account can serve, and
503 with the reason (and when it may change) while none can. Both need no key and name no account."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.clock import ManualClock
from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import gateway_process, run_gateway, run_stack, serve

MODEL = "kimi-k2-0905-preview"
HELLO: Any = [{"role": "user", "content": "hello"}]


async def test_readyz_follows_the_accounts_while_healthz_stays_up(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "accounts": {"active": 3}}

        for key in ("sk-emu-0001", "sk-emu-0002", "sk-emu-0003"):
            stack.emulator.script(key, [{"kind": "rate_limit", "wait": 30}])
        with pytest.raises(openai.RateLimitError):
            await stack.client().chat.completions.create(model=MODEL, messages=HELLO)
        unready = await http.get("/readyz")
        assert unready.status_code == 503
        assert unready.json() == {"status": "unavailable", "accounts": {"cooling_down": 3},
                                  "reason": "no account can serve now (3 cooling_down)", "next_ready_in": 30.0}
        assert unready.headers["retry-after"] == "30"
        assert (await http.get("/healthz")).status_code == 200, "alive all the same"

        stack.clock.advance(30)
        assert (await http.get("/readyz")).json() == {"status": "ready", "accounts": {"active": 3}}


@pytest.mark.parametrize(("accounts", "reason"), [
    ("", "no accounts: add one with 'kimi-pool accounts add NAME --kind KIND …' or 'kimi-pool accounts import FILE'"),
    ('[[accounts]]\nname = "off"\nkind = "kimi-ai-chat"\nenabled = false\n',
     "every account is disabled: enable one with 'kimi-pool accounts enable NAME'"),
])
async def test_readyz_says_what_to_do_when_the_pool_cannot_serve_at_all(tmp_path: Path, accounts: str,
                                                                        reason: str) -> None:
    async with run_gateway(tmp_path, accounts, clock=ManualClock()) as gateway, httpx.AsyncClient() as http:
        answer = await http.get(gateway.url + "/readyz")
        assert answer.status_code == 503 and "retry-after" not in answer.headers
        assert answer.json()["reason"] == reason and answer.json()["next_ready_in"] is None
        assert (await http.get(gateway.url + "/healthz")).status_code == 200


async def test_a_worker_passes_readyz_to_the_keeper(tmp_path: Path) -> None:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url, gateway_process(
            tmp_path, emulator_url, "--workers", "2", ready="kimi-pool ready: 2 workers") as (process, url, _log):
        async with httpx.AsyncClient(base_url=url) as http:
            answers = await asyncio.gather(*(http.get("/readyz") for _ in range(4)))
        assert all(a.status_code == 200 and a.json() == {"status": "ready", "accounts": {"active": 1}}
                   for a in answers)
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        await asyncio.wait_for(process.stderr.read(), 60)
        assert await process.wait() == 0
