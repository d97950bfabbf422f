"""``python -m bench.messages``: what the Anthropic front-end costs, as server CPU per streamed answer through
``POST /v1/messages`` against the same answer through ``POST /v1/chat/completions``.

One ``kimi-pool serve`` (4 accounts on the Moonshot emulator, a master key) on CPU 1; the emulator and this
load generator on CPU 0. Each round sends ``connections`` x ``requests`` streamed requests over keep-alive
connections to each endpoint in turn (so the machine's noise falls on both) and reads the server's user+system
CPU time from /proc. The emulator answers ``--words`` words, one SSE chunk each, at once.

    python -m bench.messages [--rounds 4] [--connections 16] [--requests 300] [--words 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp

from bench.run import KEYS, MASTER, MODEL, ROOT, cpu_seconds, save, taskset

PROMPT = [{"role": "user", "content": "Benchmark me."}]
BODIES = {
    "chat": ("/v1/chat/completions", {"model": MODEL, "messages": PROMPT, "stream": True, "max_tokens": 1024},
             b"data: [DONE]"),
    "messages": ("/v1/messages", {"model": MODEL, "messages": PROMPT, "stream": True, "max_tokens": 1024},
                 b"event: message_stop"),
}
"""Endpoint → (path, body, the line that ends a complete stream)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen[bytes], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                response.read()
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)  # a benchmark harness waiting for a server it started; not a test
    raise SystemExit(f"{url} did not come up in {limit:.0f}s")


async def client(session: aiohttp.ClientSession, url: str, body: bytes, end: bytes, requests: int) -> int:
    complete = 0
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {MASTER}"}
    for _ in range(requests):
        async with session.post(url, data=body, headers=headers) as response:
            data = await response.read()
            complete += response.status == 200 and end in data
    return complete


async def load(url: str, body: bytes, end: bytes, connections: int, requests: int) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        done = await asyncio.gather(*(client(session, url, body, end, requests) for _ in range(connections)))
    return sum(done)


def one_round(base: str, pid: int, name: str, connections: int, requests: int) -> float:
    """Server CPU microseconds per streamed request through endpoint ``name``."""
    path, body, end = BODIES[name]
    raw = json.dumps(body).encode()
    before = cpu_seconds(pid)
    complete = asyncio.run(load(base + path, raw, end, connections, requests))
    spent = cpu_seconds(pid) - before
    if complete != connections * requests:
        raise SystemExit(f"{name}: only {complete} of {connections * requests} streams completed")
    return spent / complete * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--words", type=int, default=20)
    args = parser.parse_args()
    emulator_port, port = free_port(), free_port()
    emulator = [sys.executable, "-m", "app", "emulate", "moonshot", "--port", str(emulator_port), "--keys", "4",
                "--balance", "1e12"]
    results: dict[str, list[float]] = {name: [] for name in BODIES}
    with tempfile.TemporaryDirectory() as tmp:
        toml = Path(tmp) / "accounts.toml"
        toml.write_text("".join(f'[[accounts]]\nname = "emu-{i}"\nkind = "moonshot"\napi_key = "{key}"\n'
                                f'base_url = "http://127.0.0.1:{emulator_port}/v1"\n\n'
                                for i, key in enumerate(KEYS, 1)))
        gateway = [sys.executable, "-m", "app", "--db", f"sqlite+aiosqlite:///{tmp}/bench.db", "serve", "--port",
                   str(port), "--accounts", str(toml), "--log-level", "warning"]
        env = {**os.environ, "KIMI_POOL_MASTER_KEY": MASTER}
        emu = subprocess.Popen([*taskset("0"), *emulator], cwd=ROOT, stdout=subprocess.DEVNULL)
        server = subprocess.Popen([*taskset("1"), *gateway], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        try:
            wait_for(f"http://127.0.0.1:{emulator_port}/v1/models", emu)
            request = urllib.request.Request(
                f"http://127.0.0.1:{emulator_port}/__fake/config", method="POST",
                data=json.dumps({"chunk_interval": 0.0, "reply_words": args.words}).encode(),
                headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=5).read()
            wait_for(f"http://127.0.0.1:{port}/healthz", server)
            base = f"http://127.0.0.1:{port}"
            for name in BODIES:  # warm up both paths
                one_round(base, server.pid, name, 4, 50)
            for _ in range(args.rounds):
                for name, figures in results.items():
                    figures.append(one_round(base, server.pid, name, args.connections, args.requests))
        finally:
            for proc in (server, emu):
                proc.terminate()
                proc.wait(timeout=20)
    means = {name: sum(f) / len(f) for name, f in results.items()}
    summary: dict[str, object] = {name: {"mean_us": round(means[name], 1), "runs_us": [round(x, 1) for x in f]}
                                  for name, f in results.items()}
    summary["messages_over_chat"] = round(means["messages"] / means["chat"], 3)
    save("messages.json", summary, "python -m bench.messages " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
