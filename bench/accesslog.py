"""``python -m bench.accesslog``: what the access log costs, in server CPU per request.

``kimi-pool serve`` at its default log level (``info``: one access line per request) against the
same server at ``--log-level warning`` (no access line), side by side: the Moonshot emulator (4 keys,
no limits) and the load generator on CPU 0, the server alone on CPU 1, its stderr a pipe read by this
process (as a terminal or journald would). Keep-alive clients send non-streaming chat completions;
the server's user + system CPU time comes from /proc. Rounds alternate the configurations, so the
noise of this shared machine falls on each alike.

    python -m bench.accesslog [--rounds 4] [--connections 16] [--requests 1500] [--configs info,warning,json]
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
from contextlib import contextmanager
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


def run_load(port: int, connections: int, requests: int) -> int:
    async def clients() -> list[int]:
        return await asyncio.wait_for(asyncio.gather(*(client(port, requests) for _ in range(connections))), 600)

    return sum(asyncio.run(clients()))


def load(port: int, connections: int, requests: int) -> int:
    """The load, from a child process on CPU 0 (beside the emulator); the number of failed requests."""
    code = "import sys; from bench.accesslog import run_load; print(run_load(*map(int, sys.argv[1:])))"
    out = subprocess.run([*taskset("0"), sys.executable, "-c", code, str(port), str(connections), str(requests)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"the load generator failed: {out.stderr.strip()}")
    return int(out.stdout.strip() or 0)


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


def one_round(config: str, emulator_port: int, work: Path, connections: int, requests: int) -> dict[str, float]:
    port = free_port()
    toml = work / "accounts.toml"
    toml.write_text("".join(f'[[accounts]]\nname = "emu-{i}"\nkind = "moonshot"\napi_key = "{key}"\n'
                            f'base_url = "http://127.0.0.1:{emulator_port}/v1"\n\n' for i, key in enumerate(KEYS, 1)))
    db = f"sqlite+aiosqlite:///{work}/{config}-{port}.db"
    cmd = [sys.executable, "-m", "app", "--db", db, "serve", "--port", str(port), "--accounts", str(toml),
           *CONFIGS[config]]
    with started(cmd, cpu="1", env={"KIMI_POOL_MASTER_KEY": MASTER}) as server:
        wait_listening(port, server)
        load(port, 4, 100)  # warm up
        before = cpu_seconds(server.pid)
        bad = load(port, connections, requests)
        used = cpu_seconds(server.pid) - before
    total = connections * requests
    return {"cpu_us_per_request": used / total * 1e6, "requests": total, "failed": bad,
            "log_lines": server.lines}  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--configs", default="info,warning")
    args = parser.parse_args()
    configs = args.configs.split(",")
    emulator_port = free_port()
    emulator = [sys.executable, "-m", "app", "emulate", "moonshot", "--port", str(emulator_port), "--keys", "4",
                "--balance", "1e12"]
    runs: dict[str, list[dict[str, float]]] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory() as tmp, started(emulator, cpu="0") as emu:
        wait_listening(emulator_port, emu)
        for _ in range(args.rounds):
            for config in configs:
                figures = one_round(config, emulator_port, Path(tmp), args.connections, args.requests)
                runs[config].append(figures)
                print(f"{config:8} {figures}", file=sys.stderr)
    medians = {config: statistics.median(r["cpu_us_per_request"] for r in rows) for config, rows in runs.items()}
    summary: dict[str, dict[str, object]] = {
        config: {"median_cpu_us_per_request": round(medians[config], 1),
                 "runs": [round(r["cpu_us_per_request"], 1) for r in rows],
                 "failed": sum(int(r["failed"]) for r in rows)}
        for config, rows in runs.items()}
    for config in set(medians) - {"warning"}:
        if "warning" in medians:
            summary[config]["over_quiet"] = round(medians[config] / medians["warning"] - 1, 3)
    print(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python -m bench.accesslog "
                      + " ".join(sys.argv[1:]), "results": summary}, indent=2))


if __name__ == "__main__":
    main()
