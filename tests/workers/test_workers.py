"""``kimi-pool serve --workers 2`` as a real process tree: the keeper and two workers on one port,
driven with the openai SDK over many connections (the kernel spreads new connections over the
workers). What a client must see: one round robin, one set of limits, one cooldown and one binding
per conversation for the whole pool, whichever worker its connection lands on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai

from app.emulator.kimi_web import KimiWebEmulatorConfig, create_kimi_web_emulator, mint_jwt
from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import MASTER_KEY, accounts_toml, free_port, gateway_process, read_until, serve

MODEL = "kimi-k2-0905-preview"
READY = "kimi-pool ready: 2 workers"
MESSAGES: Any = [{"role": "user", "content": "hello"}]


@contextlib.asynccontextmanager
async def workers(tmp_path: Path, keys: int, script: dict[str, list[dict[str, Any]]] | None = None,
                  master_key: str | None = MASTER_KEY, **limits: Any) -> AsyncIterator[tuple[Any, Any, str, list[str]]]:
    """The emulator with ``keys`` organizations and ``serve --workers 2`` on them; yields the emulator,
    the keeper process, the gateway URL and its log so far. ``master_key`` None: an open gateway."""
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=keys))
    emulator = emulator_app.state.emulator
    for key, outcomes in (script or {}).items():
        emulator.script(key, outcomes)
    async with serve(emulator_app) as emulator_url:
        accounts = accounts_toml(emulator_url, [f"sk-emu-{i:04d}" for i in range(1, keys + 1)], **limits)
        async with gateway_process(tmp_path, emulator_url, "--workers", "2", accounts=accounts,
                                   ready=READY, master_key=master_key) as (process, url, log):
            yield emulator, process, url, log


async def ask(url: str, **headers: str) -> str:
    """One chat completion on a connection of its own; the account that answered."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0,
                                  default_headers=headers) as client:
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    return raw.headers["x-kimi-pool-account"]


async def access_lines(process: Any, log: list[str], count: int) -> list[dict[str, str]]:
    """The next ``count`` access lines of the server's log, as their ``key=value`` fields."""
    lines: list[dict[str, str]] = []
    while len(lines) < count:
        await asyncio.wait_for(read_until(process.stderr, "kimi_pool.access", log), 30)
        lines.append(dict(re.findall(r"(\w+)=(\S+)", log[-1].split("kimi_pool.access:", 1)[1])))
    return lines


async def test_one_round_robin_and_one_set_of_rate_limits_for_all_workers(tmp_path: Path) -> None:
    async with workers(tmp_path, keys=4, rpm=10) as (emulator, process, url, log):
        order = [await ask(url) for _ in range(24)]
        assert order == [f"acct-{i % 4 + 1}" for i in range(24)], "the ring turns once for the whole pool"

        # 4 accounts x 10 a minute = 40; 24 are used: of 30 sent at once, 16 pass and 14 are refused
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0,
                                      default_headers={"X-Kimi-Pool-Max-Wait": "0"}) as client:
            results = await asyncio.gather(
                *(client.chat.completions.create(model=MODEL, messages=MESSAGES) for _ in range(30)),
                return_exceptions=True)
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(refused) == 14 and len(results) - len(refused) == 16, results
        assert emulator.snapshot()["totals"]["requests"] == 40, "no worker spent more than the pool's limits"

        lines = await access_lines(process, log, 54)
        assert {line["worker"] for line in lines} == {"0", "1"}, "both workers served (else this proves nothing)"
        assert sum(line["status"] == "429" for line in lines) == 14


async def test_an_open_gateway_with_workers_answers_loopback_names_and_pages_only(tmp_path: Path) -> None:
    async with workers(tmp_path, keys=1, master_key=None) as (emulator, _process, url, _log):
        for _ in range(8):  # a connection each: the kernel spreads them over both workers
            async with httpx.AsyncClient(base_url=url) as http:
                for headers in ({"Host": "rebound.example"}, {"Origin": "https://evil.example"}):
                    refused = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES},
                                              headers=headers)
                    assert refused.status_code == 403, refused.text
                    assert refused.json()["error"]["code"] in ("host_not_allowed", "origin_not_allowed")
                    assert (await http.get("/v1/models", headers=headers)).status_code == 403
                served = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES},
                                         headers={"Host": "localhost", "Origin": "http://localhost:3000"})
                assert served.status_code == 200, served.text
        assert emulator.snapshot()["totals"]["requests"] == 8, "only the loopback requests reached the upstream"


async def test_a_cooldown_and_a_conversation_hold_on_every_worker(tmp_path: Path) -> None:
    script = {"sk-emu-0001": [{"kind": "rate_limit", "bucket": "rpm", "wait": 30}]}
    async with workers(tmp_path, keys=3, script=script) as (emulator, process, url, log):
        assert await ask(url) == "acct-2", "acct-1 said 429: the request moved on"
        answered = [await ask(url) for _ in range(12)]
        assert "acct-1" not in answered, "every worker knows acct-1 is cooling down"
        assert emulator.snapshot()["keys"]["sk-emu-0001"]["requests"] == 1

        held = {await ask(url, **{"X-Session-Id": "conversation-7"}) for _ in range(12)}
        assert len(held) == 1 and held != {"acct-1"}, "one conversation, one account, whichever worker"

        lines = await access_lines(process, log, 25)
        assert {line["worker"] for line in lines} == {"0", "1"}


async def test_a_killed_worker_gives_back_its_leases_and_is_replaced(tmp_path: Path) -> None:
    script = {"sk-emu-0001": [{"kind": "hold_after", "chunks": 0}]}
    async with workers(tmp_path, keys=1, script=script, concurrency=1) as (emulator, process, url, log):
        pids = [int(pid) for pid in re.findall(r"worker \d \(pid (\d+)\) serving", "".join(log))]
        assert len(pids) == 2
        pending = asyncio.ensure_future(ask(url))
        await emulator.wait_for(lambda e: e.held == 1)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0,
                                      default_headers={"X-Kimi-Pool-Max-Wait": "0"}) as client:
            try:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
                raise AssertionError("the account's one slot is taken: this must be refused")
            except openai.RateLimitError:
                pass

        for pid in pids:  # whichever of them holds the request
            os.kill(pid, signal.SIGKILL)
        try:
            await pending
            raise AssertionError("the worker serving the request was killed")
        except openai.APIConnectionError:
            pass
        await asyncio.wait_for(read_until(process.stderr, "went away holding 1 lease(s); released", log), 30)
        for _ in range(2):
            await asyncio.wait_for(read_until(process.stderr, ") serving", log), 60)
        await emulator.wait_for(lambda e: e.held == 0)

        assert await ask(url, **{"X-Kimi-Pool-Max-Wait": "0"}) == "acct-1", "the slot came back"
        assert process.returncode is None


async def test_admin_metrics_and_usage_see_every_worker_and_sigterm_exits_0(tmp_path: Path) -> None:
    async with workers(tmp_path, keys=2) as (_emulator, process, url, _log):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as admin:
            created = await admin.post("/admin/keys", json={"name": "team-a"})
            assert created.status_code == 201, created.text
            key = created.json()["key"]
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
                reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert reply.choices[0].message.content, "a key made through the admin API works at once"
            for _ in range(9):
                await ask(url)

            metrics = (await admin.get("/metrics")).text
            served = sum(float(v) for v in re.findall(r'^kimi_pool_requests_total\{[^}]*outcome="ok"[^}]*\} (\S+)',
                                                       metrics, re.M))
            assert served == 10, "the keeper's /metrics counts what both workers served"
            health = (await admin.get("/healthz")).json()
            assert health["workers"] == {"wanted": 2, "serving": 2}

            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
                first = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, extra_headers={"Idempotency-Key": "order-42"})
                again = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, extra_headers={"Idempotency-Key": "order-42"})
                assert again.headers.get("idempotent-replayed") == "true", "keyed requests are claimed in one place"
                assert again.parse().id == first.parse().id

                uploaded = await client.files.create(file=("in.jsonl", b'{"custom_id": "a"}\n' * 5000),
                                                     purpose="batch")
                content = await client.files.content(uploaded.id)
                assert content.content == b'{"custom_id": "a"}\n' * 5000, "an upload streams through a worker intact"

            disabled = await admin.post("/admin/accounts/acct-1/disable", json={"reason": "maintenance"})
            assert disabled.status_code == 200, disabled.text
            assert {await ask(url) for _ in range(6)} == {"acct-2"}, "an operator's disable reaches every worker"

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
        rows = db.execute("SELECT client_key, count(*) FROM usage GROUP BY client_key ORDER BY 1").fetchall()
    assert rows == [("master", 16), ("team-a", 1)], "every worker's requests are in the usage table (a replay is not)"


def test_workers_need_a_free_port_and_say_so_in_one_line(tmp_path: Path) -> None:
    with contextlib.closing(socket.create_server(("127.0.0.1", 0))) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "app", "--db", f"sqlite+aiosqlite:///{tmp_path}/k.db", "serve", "--port",
             str(port), "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == f"kimi-pool: error: cannot listen on 127.0.0.1:{port}: " \
                                                   "Address already in use"
    assert "Traceback" not in done.stderr
    free = free_port()
    bad = subprocess.run([sys.executable, "-m", "app", "serve", "--port", str(free), "--workers", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--workers" in bad.stderr


async def test_sigterm_lets_a_workers_stream_finish_and_records_it(tmp_path: Path) -> None:
    script = {"sk-emu-0001": [{"kind": "hold_after", "chunks": 3}]}
    async with workers(tmp_path, keys=1, script=script) as (emulator, process, url, log):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
            stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            chunks = [await anext(stream)]
            await emulator.wait_for(lambda e: e.held == 1)

            process.send_signal(signal.SIGTERM)  # to the keeper only: it stops its workers
            await asyncio.wait_for(read_until(process.stderr, "Shutting down", log), 30)
            emulator.release()
            chunks += [chunk async for chunk in stream]
        assert chunks[-1].choices[0].finish_reason == "stop", "the stream in flight ran to its end"
        assert await asyncio.wait_for(process.wait(), 60) == 0
    with sqlite3.connect(tmp_path / "kimi-pool.db") as db:
        assert db.execute("SELECT outcome, stream FROM usage").fetchall() == [("ok", 1)]


async def test_a_client_leaving_the_keepers_queue_through_a_worker_costs_nothing(tmp_path: Path) -> None:
    script = {"sk-emu-0001": [{"kind": "hold_after", "chunks": 0}]}
    async with workers(tmp_path, keys=1, script=script, concurrency=1) as (emulator, _process, url, _log):
        first = asyncio.ensure_future(ask(url))
        await emulator.wait_for(lambda e: e.held == 1)
        queued = asyncio.ensure_future(ask(url))
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as http:
            while (await http.get("/v1/pool/status")).json()["queue"]["depth"] != 1:
                pass  # each status read is a round trip to the keeper: the request is on its way to the queue
            queued.cancel()
            while (await http.get("/v1/pool/status")).json()["queue"]["depth"] != 0:
                pass  # the worker tells the keeper the request is gone
            emulator.release()
            assert await first == "acct-1"
            assert emulator.snapshot()["totals"]["requests"] == 1, "the abandoned request never reached the upstream"
            status = (await http.get("/v1/pool/status")).json()
        assert status["accounts"][0]["in_flight"] == 0


async def test_a_kimi_web_conversation_continues_one_upstream_chat_whichever_worker_takes_a_turn(
        tmp_path: Path) -> None:
    app = create_kimi_web_emulator(KimiWebEmulatorConfig.simple(1))
    emulator = app.state.emulator
    async with serve(app) as emulator_url:
        token = mint_jwt(emulator.config.users[0], now=time.time())
        accounts = f'[[accounts]]\nname = "web-1"\nkind = "kimi-web"\ntoken = "{token}"\nbase_url = "{emulator_url}"\n'
        async with gateway_process(tmp_path, emulator_url, "--workers", "2", accounts=accounts,
                                   ready=READY) as (process, url, log):
            messages: list[dict[str, str]] = []
            for turn in range(1, 17):  # each turn on a connection of its own
                messages.append({"role": "user", "content": f"question {turn}"})
                async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0,
                                              default_headers={"X-Session-Id": "conv-9"}) as client:
                    answer = await client.chat.completions.create(model="kimi-k2.5", messages=messages)  # type: ignore[arg-type]
                messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
            lines = await access_lines(process, log, 16)
    assert {line["worker"] for line in lines} == {"0", "1"}, "the turns were served by both workers"
    [chat] = emulator.chats.values()
    sent = [m.content for m in chat.messages if m.role == "user"]
    assert sent == [f"question {turn}" for turn in range(1, 17)], "each turn sent only what was new, to one chat"


async def test_workers_serve_anthropic_messages_and_accept_each_others_thinking(tmp_path: Path) -> None:
    """``POST /v1/messages`` is a hot path: the workers serve it. The thinking signature one process issues is
    accepted by every other (the key is in the database), here by the keeper's ``count_tokens``."""
    async with workers(tmp_path, keys=2) as (emulator, process, url, log):
        emulator.script_answers(None, [{"reasoning": f"thought {i}", "content": f"answer {i}"} for i in range(8)])
        ask: Any = [{"role": "user", "content": "think"}]
        for i in range(8):  # a client (a connection) per turn: the kernel spreads them over both workers
            async with anthropic.AsyncAnthropic(base_url=url, api_key=MASTER_KEY, max_retries=0) as client:
                answer = await client.messages.create(model="kimi-k2.5", max_tokens=4096, messages=ask,
                                                      thinking={"type": "enabled", "budget_tokens": 1024})
            assert [block.type for block in answer.content] == ["thinking", "text"]
            assert answer.content[0].thinking == f"thought {i}"  # type: ignore[union-attr]
            history: Any = [*ask, {"role": "assistant", "content": answer.content}, {"role": "user", "content": "?"}]
            async with anthropic.AsyncAnthropic(base_url=url, api_key=MASTER_KEY, max_retries=0) as client:
                counted = await client.messages.count_tokens(model="kimi-k2.5", messages=history)
            assert counted.input_tokens > 0

        lines = await access_lines(process, log, 8)
        assert {line["worker"] for line in lines} == {"0", "1"}, "both workers served messages"
