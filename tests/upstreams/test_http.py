"""An account whose stored settings aiohttp cannot turn into a request (a key with a line break, a base
URL or proxy it cannot parse; stored before such input was refused) fails over, once: it is marked
``auth_dead`` with a reason saying its configuration is broken, and no request gets a 500."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.accounts_config import AccountSpec
from app.cli import run
from app.emulator.moonshot import MoonshotEmulatorConfig
from app.store.db import Database
from app.store.repository import AccountRepository
from tests.conftest import MASTER_KEY, reload, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]
INJECTED = "sk-emu-0003\r\nX-Injected: yes"


async def test_accounts_with_broken_settings_fail_over_and_are_marked(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001", "sk-emu-0002"],
                         emulator=MoonshotEmulatorConfig.simple(keys=3)) as stack:
        base = f"{stack.emulator_url}/v1"
        broken = [AccountSpec("broken-key", "moonshot", secret=INJECTED, base_url=base),
                  AccountSpec("broken-url", "moonshot", secret="sk-emu-0003", base_url="http://127.0.0.1:99999/v1"),
                  AccountSpec("broken-proxy", "kimi-ai-chat", models=(MODEL,), proxy="http://[::1")]
        db = Database(stack.db_url)  # straight into the table: no validation on this way in
        try:
            async with db.session() as session, session.begin():
                for spec in broken:
                    await AccountRepository(session).add(spec, stack.clock.time())
        finally:
            await db.dispose()
        await reload(stack)

        client = stack.client()
        for i in range(8):
            if i % 2:
                stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
                assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            else:
                assert (await client.chat.completions.create(model=MODEL, messages=HELLO)).choices[0].message.content

        accounts = stack.gateway.pool.accounts
        for spec in broken:
            assert accounts[spec.name].state == "auth_dead", spec.name
            assert "configuration is broken" in (accounts[spec.name].reason or "")
        assert "control character" in (accounts["broken-key"].reason or "")
        assert "base URL or proxy" in (accounts["broken-proxy"].reason or "")
        seen = stack.emulator.snapshot()
        assert seen["totals"]["by_status"] == {"200": 8} and seen["keys"]["sk-emu-0003"]["requests"] == 0

        await stack.app.state.writer.flush()
        assert await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "list", "--json"]) == 0
        listed = capsys.readouterr().out
        assert listed.count("configuration is broken") == 3 and "X-Injected" not in listed
        async with stack.http() as http:
            status = await http.get("/v1/pool/status", headers={"Authorization": f"Bearer {MASTER_KEY}"})
        assert "X-Injected" not in status.text and "::1" not in status.text
