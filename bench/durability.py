"""``python -m bench.durability``: what a ``kill -9`` loses, and what writing account states through costs.

Usage rows ride the write-behind queue (written every ``--flush-interval`` seconds, 1 by default): a
server killed under load loses the rows of the requests it answered since its last write. Account
states are written through: a request that caused one waits for its commit before it fails over.

Against the Moonshot emulator (4 keys, no limits) and a real ``kimi-pool serve`` child on a fresh
SQLite file each time:

1. ``--trials`` times: ``--clients`` clients send requests back to back; after a random 1-3 s the
   server is SIGKILLed while they still do. Lost = responses the clients got minus the usage rows in
   the database; ``window_s`` = how long before the kill the earliest of them was answered (rows are
   written in the order requests end, so the lost ones are the last answered).
2. The latency of a request that fails over once after a scripted 429 (the account's cooldown is
   written before it moves on) against one that fails over after a scripted overload (no state
   change, nothing written): medians of ``--samples`` each.

    python -m bench.durability [--trials 5] [--clients 32] [--flush-interval 1] [--samples 15] [--pause 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.run import save

MASTER = "bench-master-key-0123456789"
MODEL = "kimi-k2-0905-preview"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Benchmark me."}]}
KEYS = [f"sk-emu-{n:04d}" for n in range(1, 5)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_up(url: str, headers: dict[str, str], body: object) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(600):
            try:
                if (await http.post(url, json=body, headers=headers)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)  # a harness waiting for a server it started; not a test
    raise SystemExit(f"{url} did not come up")


class Server:
    """``kimi-pool serve`` on the emulator's 4 keys, in ``work``."""

    def __init__(self, work: Path, emulator: str, flush_interval: float) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        toml = work / "accounts.toml"
        toml.write_text("".join(f'[[accounts]]\nname = "emu-{i}"\nkind = "moonshot"\napi_key = "{key}"\n'
                                f'base_url = "{emulator}/v1"\n\n' for i, key in enumerate(KEYS, 1)))
        self.db = work / "kimi-pool.db"
        self.cmd = [sys.executable, "-m", "app", "--db", f"sqlite+aiosqlite:///{self.db}", "serve", "--port",
                    str(self.port), "--accounts", str(toml), "--log-level", "warning", "--flush-interval",
                    str(flush_interval)]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.cmd, env={**os.environ, "KIMI_POOL_MASTER_KEY": MASTER}, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        await wait_up(self.url + "/v1/chat/completions", {"Authorization": f"Bearer {MASTER}"}, BODY)

    async def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()

    def usage_rows(self) -> int:
        with sqlite3.connect(self.db) as db:
            return int(db.execute("SELECT count(*) FROM usage").fetchone()[0])


async def kill_under_load(server: Server, clients: int, after: float, pause: float) -> dict[str, float]:
    answered: list[float] = []  # when each 200 arrived
    baseline = server.usage_rows()  # the readiness probe's, if written already
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal answered
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {MASTER}"},
                                     timeout=10) as http:
            while not stop.is_set():
                try:
                    response = await http.post("/v1/chat/completions", json=BODY)
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    answered.append(time.perf_counter())
                if pause:
                    await asyncio.sleep(pause)  # the load generator's pacing

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    started = time.perf_counter()
    await asyncio.sleep(after)  # the moment of the crash, chosen at random
    killed = time.perf_counter()
    await server.kill()
    stop.set()
    await asyncio.gather(*tasks)
    answered = sorted(t for t in answered if t <= killed)
    rows = server.usage_rows() - baseline
    lost = max(0, len(answered) - rows)
    window = killed - answered[len(answered) - lost] if lost else 0.0
    return {"ran_s": round(killed - started, 2), "answered": len(answered), "rows": rows, "lost": lost,
            "req_per_s": round(len(answered) / (killed - started)), "window_s": round(window, 3)}


async def failover_latency(server: Server, emulator: str, samples: int) -> dict[str, float]:
    async def timed(http: httpx.AsyncClient, control: httpx.AsyncClient, outcome: dict[str, object]) -> float:
        (await control.post("/__fake/script", json={"key": "*", "outcomes": [outcome]})).raise_for_status()
        began = time.perf_counter()
        response = await http.post("/v1/chat/completions", json=BODY)
        assert response.status_code == 200, response.text
        return (time.perf_counter() - began) * 1000

    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {MASTER}"},
                                 timeout=10) as http, httpx.AsyncClient(base_url=emulator) as control:
        plain = [await timed(http, control, {"kind": "ok"}) for _ in range(samples)]
        overload = [await timed(http, control, {"kind": "overloaded"}) for _ in range(samples)]
        cooled = []
        for _ in range(samples):
            cooled.append(await timed(http, control, {"kind": "rate_limit", "bucket": "concurrency", "wait": 1}))
            await asyncio.sleep(1.1)  # let the cooled account come back, so every sample fails over once
    return {"plain_ms": round(statistics.median(plain), 2),
            "failover_no_state_ms": round(statistics.median(overload), 2),
            "failover_state_written_ms": round(statistics.median(cooled), 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--flush-interval", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds each client waits between requests")
    args = parser.parse_args()
    emulator_port = free_port()
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    emulator = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "emulate", "moonshot", "--port", str(emulator_port), "--keys", "4",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    trials: list[dict[str, float]] = []
    try:
        await wait_up(emulator_url + "/v1/chat/completions", {"Authorization": f"Bearer {KEYS[0]}"}, BODY)
        for n in range(args.trials):
            with tempfile.TemporaryDirectory(prefix="kimi-pool-durability-") as work:
                server = Server(Path(work), emulator_url, args.flush_interval)
                await server.start()
                trial = await kill_under_load(server, args.clients, random.uniform(1.0, 3.0), args.pause)
                print(f"  kill -9 #{n + 1}: {trial}", file=sys.stderr)
                trials.append(trial)
        with tempfile.TemporaryDirectory(prefix="kimi-pool-durability-") as work:
            server = Server(Path(work), emulator_url, args.flush_interval)
            await server.start()
            try:
                latency = await failover_latency(server, emulator_url, args.samples)
            finally:
                await server.stop()
        print(f"  latency: {latency}", file=sys.stderr)
    finally:
        emulator.terminate()
        await emulator.wait()
    summary = {"lost_max": max(t["lost"] for t in trials), "window_s_max": max(t["window_s"] for t in trials),
               "window_s_mean": round(statistics.mean(t["window_s"] for t in trials), 3)}
    save("durability.json", {"trials": trials, "summary": summary, "latency": latency},
         f"python -m bench.durability --trials {args.trials} --clients {args.clients} "
         f"--flush-interval {args.flush_interval} --samples {args.samples} --pause {args.pause}")
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
