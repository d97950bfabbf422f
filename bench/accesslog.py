"""``python -m bench.accesslog``: what the access log costs, in server CPU per request.

``kimi-pool serve`` at its default log level (``info``: one access line per request) against the
same server at ``--log-level warning`` (no access line), side by side: the Moonshot emulator (4 keys,
no limits) and the load generator on CPU 0; one server per configuration, all on CPU 1 and loaded at
the same time, so whatever else this shared machine does falls on each alike; each server's stderr
a pipe read by this process (as a terminal or journald would). Keep-alive clients send non-streaming
chat completions; each server's user + system CPU time comes from /proc. ``over_quiet`` is the
median over rounds of a configuration's CPU per request over the quiet one's in the same round.

    python -m bench.accesslog [--rounds 5] [--connections 8] [--requests 1000] [--configs info,warning,json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = [f"sk-emu-{n:04d}" for n in range(1, 5)]
MASTER = "bench-master-key-0123456789"
PROMPT = [{"role": "user", "content": "Benchmark me."}]
BODY = json.dumps({"model": "kimi-k2-0905-preview", "messages": PROMPT}).encode()
CONFIGS = {"info": [], "warning": ["--log-level", "warning"], "json": ["--log-format", "json"]}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def taskset(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if (os.cpu_count() or 1) > 1 and Path("/usr/bin/taskset").exists() else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def request(port: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
            % (port, MASTER.encode(), len(BODY), BODY))


async def client(port: int, requests: int) -> int:
    """Send ``requests`` on one keep-alive connection; return how many were not 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw, bad = request(port), 0
    for _ in range(requests):
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        bad += not head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    writer.close()
    return bad


def run_load(ports: list[int], connections: int, requests: int) -> list[int]:
    """``connections`` clients on each port at once, ``requests`` each; the failures per port."""
    async def clients() -> list[int]:
        per_port = [asyncio.gather(*(client(port, requests) for _ in range(connections))) for port in ports]
        return [sum(bad) for bad in await asyncio.wait_for(asyncio.gather(*per_port), 900)]

    return asyncio.run(clients())


def load(ports: list[int], connections: int, requests: int) -> list[int]:
    """The load, from a child process on CPU 0 (beside the emulator); the failed requests per port."""
    code = ("import sys, json; from bench.accesslog import run_load; "
            "print(json.dumps(run_load(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))")
    out = subprocess.run([*taskset("0"), sys.executable, "-c", code, json.dumps(ports), str(connections),
                          str(requests)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"the load generator failed: {out.stderr.strip()}")
    failed: list[int] = json.loads(out.stdout)
    return failed


def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args!r} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.1)  # a benchmark harness waiting for the server it started; not a test
    raise SystemExit(f"nothing listens on port {port}")


@contextmanager
def started(cmd: list[str], *, cpu: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([*taskset(cpu), *cmd], cwd=ROOT, env={**os.environ, **(env or {})},
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = [0]

    def drain() -> None:  # the reader at the other end of the server's stderr
        assert process.stderr is not None
        for _ in process.stderr:
            lines[0] += 1

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(10)
        process.lines = lines[0]  # type: ignore[attr-defined]


def one_round(configs: list[str], emulator_port: int, work: Path, connections: int,
              requests: int) -> dict[str, dict[str, float]]:
    """One server per configuration, all on CPU 1 and loaded at the same time (so whatever else the
    machine does falls on each alike); each one's CPU time per request."""
    toml = work / "accounts.toml"
    toml.write_text("".join(f'[[accounts]]\nname = "emu-{i}"\nkind = "moonshot"\napi_key = "{key}"\n'
                            f'base_url = "http://127.0.0.1:{emulator_port}/v1"\n\n' for i, key in enumerate(KEYS, 1)))
    ports = [free_port() for _ in configs]
    with ExitStack() as stack:
        servers = []
        for config, port in zip(configs, ports, strict=True):
            db = f"sqlite+aiosqlite:///{work}/{config}-{port}.db"
            cmd = [sys.executable, "-m", "app", "--db", db, "serve", "--port", str(port), "--accounts", str(toml),
                   *CONFIGS[config]]
            servers.append(stack.enter_context(started(cmd, cpu="1", env={"KIMI_POOL_MASTER_KEY": MASTER})))
        for port, server in zip(ports, servers, strict=True):
            wait_listening(port, server)
        load(ports, 4, 100)  # warm up
        before = [cpu_seconds(server.pid) for server in servers]
        failed = load(ports, connections, requests)
        used = [cpu_seconds(server.pid) - was for server, was in zip(servers, before, strict=True)]
    total = connections * requests
    return {config: {"cpu_us_per_request": cpu / total * 1e6, "requests": total, "failed": bad,
                     "log_lines": server.lines}  # type: ignore[attr-defined]
            for config, cpu, bad, server in zip(configs, used, failed, servers, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=8, help="per server")
    parser.add_argument("--requests", type=int, default=1000, help="per connection")
    parser.add_argument("--configs", default="info,warning")
    args = parser.parse_args()
    configs = args.configs.split(",")
    emulator_port = free_port()
    emulator = [sys.executable, "-m", "app", "emulate", "moonshot", "--port", str(emulator_port), "--keys", "4",
                "--balance", "1e12"]
    runs: dict[str, list[dict[str, float]]] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory() as tmp, started(emulator, cpu="0") as emu:
        wait_listening(emulator_port, emu)
        for n in range(args.rounds):
            order = configs[n % len(configs):] + configs[:n % len(configs)]  # who starts first changes
            for config, figures in one_round(order, emulator_port, Path(tmp), args.connections, args.requests).items():
                runs[config].append(figures)
                print(f"{config:8} {figures}", file=sys.stderr)
    summary: dict[str, dict[str, object]] = {
        config: {"median_cpu_us_per_request": round(statistics.median(r["cpu_us_per_request"] for r in rows), 1),
                 "runs": [round(r["cpu_us_per_request"], 1) for r in rows],
                 "failed": sum(int(r["failed"]) for r in rows)}
        for config, rows in runs.items()}
    if "warning" in runs:
        for config in set(runs) - {"warning"}:
            ratios = [r["cpu_us_per_request"] / q["cpu_us_per_request"]
                      for r, q in zip(runs[config], runs["warning"], strict=True)]
            summary[config]["over_quiet_by_round"] = [round(ratio - 1, 3) for ratio in ratios]
            summary[config]["over_quiet"] = round(statistics.median(ratios) - 1, 3)
    print(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python -m bench.accesslog "
                      + " ".join(sys.argv[1:]), "results": summary}, indent=2))


if __name__ == "__main__":
    main()
