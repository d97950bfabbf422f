"""``GET /v1/pool/status``: a client key sees what it needs to pace itself (the queue's depth; per model,
accounts ready now and the next free time), never account names, organisations or other clients; the
master key, and anyone on an open (loopback-only) gateway, sees everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import MASTER_KEY, create_client_key, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]


async def test_a_client_key_sees_the_queue_and_per_model_readiness_only(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        key = await create_client_key(stack, "team", capsys)
        stack.emulator.script("sk-emu-0001", [{"kind": "rate_limit", "bucket": "rpm", "wait": 20}])
        for _ in range(2):
            await stack.client(key).chat.completions.create(model=MODEL, messages=HELLO)

        mine = await http.get("/v1/pool/status", headers={"Authorization": f"Bearer {key}"})
        assert mine.status_code == 200
        view = mine.json()
        assert set(view) == {"now", "queue", "models"} and view["queue"] == {"depth": 0}
        assert view["models"][MODEL] == {"ready": 2, "next_free_in": 0}, "acct-1 cools down for 20 s"
        for secret in ("acct-", "org-", "sk-emu", "team", "rate", "RPM"):
            assert secret not in mine.text, secret

        full = (await http.get("/v1/pool/status", headers={"Authorization": f"Bearer {MASTER_KEY}"})).json()
        assert {a["name"] for a in full["accounts"]} == {"acct-1", "acct-2", "acct-3"}
        assert "org-0001" in full["accounts"][0]["reason"], "the operator sees the reason, organisation and all"
        assert full["queue"]["by_client"] == {} and full["next_free_in"][MODEL] == 0
        assert full["models"][MODEL] == {"ready": 2, "next_free_in": 0}

        stack.clock.advance(20)
        again = (await http.get("/v1/pool/status", headers={"X-Api-Key": key})).json()
        assert again["models"][MODEL]["ready"] == 3
        assert (await http.get("/v1/pool/status")).status_code == 401


async def test_an_open_gateway_shows_everything_on_loopback(tmp_path: Path) -> None:
    async with run_stack(tmp_path, settings={"master_key": None}) as stack, stack.http() as http:
        view = (await http.get("/v1/pool/status")).json()
        assert len(view["accounts"]) == 3 and view["models"][MODEL]["ready"] == 3
