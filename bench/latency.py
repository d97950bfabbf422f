"""``python -m bench.latency``: the latency a path adds at a steady rate below saturation.

wrk keeps its 32 connections busy, so its p50 is set by throughput (32 / requests per second), not by
what each request costs. Here an open-loop client sends non-streaming requests at a fixed rate over
32 keep-alive connections and times each from the moment it was due (a late send counts against the
path, so stalls are not hidden). Direct to the emulator, through the passthrough and through
kimi-pool, one after another, pinned as in ``bench/run.py`` (server on CPU 1; emulator and client on
CPU 0). ``added`` = the path's percentile minus the direct one's.

    python -m bench.latency [--rates 1000,3000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.run import BIN, BODY, KEYS, PORTS, emulator_config, post, save, started, taskset, url_of, wait_ready
from bench.run import target_command as single_target
from bench.streams import percentile

CONNECTIONS = 32


async def steady(url: str, key: str, rate: float, seconds: float) -> dict[str, float]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = BODY.encode()
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(CONNECTIONS * 4):  # open and warm the connections
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()

        async def one(due: float) -> None:
            nonlocal errors
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - due)

        start = time.perf_counter()
        tasks = []
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*tasks)
    ms = [x * 1000 for x in latencies]
    return {"rate": rate, "requests": total, "errors": errors, "p50_ms": round(percentile(ms, 0.5), 2),
            "p90_ms": round(percentile(ms, 0.9), 2), "p99_ms": round(percentile(ms, 0.99), 2)}


def client(url: str, key: str, rate: float, seconds: float) -> dict[str, float]:
    """The client in its own process on CPU 0, beside the emulator."""
    import subprocess

    code = ("import asyncio, json, sys; from bench.latency import steady; "
            "print(json.dumps(asyncio.run(steady(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))))")
    out = subprocess.run([*taskset("0"), str(BIN / "python"), "-c", code, url, key, str(rate), str(seconds)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,3000")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    results: dict[str, list[dict[str, float]]] = {}
    emulator = [str(BIN / "kimi-pool"), "emulate", "moonshot", "--port", str(PORTS["emulator"]), "--keys", "4",
                "--balance", "1e12"]
    with tempfile.TemporaryDirectory() as tmp, started(emulator, cpu="0") as emu:
        wait_ready(url_of("emulator"), KEYS[0], emu)
        emulator_config({"chunk_interval": 0.0, "reply_words": 12})
        results["direct"] = [client(url_of("emulator"), KEYS[0], rate, args.seconds) for rate in rates]
        print(f"direct: {results['direct']}", file=sys.stderr)
        for name in ("passthrough", "kimi-pool"):
            cmd, env, key = single_target(name, Path(tmp))
            with started(cmd, cpu="1", env=env) as proc:
                wait_ready(url_of(name), key, proc)
                for _ in range(50):
                    post(url_of(name), BODY, key)
                results[name] = [client(url_of(name), key, rate, args.seconds) for rate in rates]
            print(f"{name}: {results[name]}", file=sys.stderr)
    for name in ("passthrough", "kimi-pool"):
        for row, base in zip(results[name], results["direct"], strict=True):
            row["added_p50_ms"] = round(row["p50_ms"] - base["p50_ms"], 2)
            row["added_p99_ms"] = round(row["p99_ms"] - base["p99_ms"], 2)
    save("latency.json", results, "python -m bench.latency " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
