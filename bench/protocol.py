"""What ``app.netguard``'s protocol costs per request: server CPU time, plain httptools against the
guarded protocol, the same trivial ASGI app (so the protocol is most of the work), keep-alive clients.

    python bench/protocol.py [--rounds 4] [--connections 16] [--requests 3000]

Each round starts one server per protocol in a child process, sends ``connections`` x ``requests``
POSTs (head ~160 bytes, body 81) and reads the server's user+system CPU time from /proc. Rounds
alternate the protocols, so the machine's noise falls on both. Runs on the 2-core dev box
(2026-12-04, ``--rounds 8``): plain 22.9 µs/request (22.1-23.8), guarded 23.7 (22.3-24.4); other runs
put the difference at 0.4-1.6 µs. That is under 1% of the ~125-180 µs of CPU a gateway request costs
(bench/RESULTS.md), below what ``bench/run.py`` can tell apart on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = """
import sys, uvicorn
from app.netguard import NetLimits, http_protocol

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})

http = http_protocol(NetLimits(max_connections=10_000)) if sys.argv[1] == "guarded" else "httptools"
uvicorn.run(app, port=int(sys.argv[2]), http=http, loop="uvloop", log_level="error", lifespan="off", access_log=False)
"""
BODY = b'{"model":"kimi-k2","messages":[{"role":"user","content":"hello there friend"}]}'
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def client(port: int, requests: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(requests):
        writer.write(REQUEST)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
    writer.close()


async def load(port: int, connections: int, requests: int) -> None:
    await asyncio.gather(*(client(port, requests) for _ in range(connections)))


def one_round(protocol: str, connections: int, requests: int) -> float:
    """Server CPU microseconds per request."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, protocol, str(port)], cwd=ROOT)
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)  # a harness waiting for the server it started; not a test
        asyncio.run(load(port, 4, 200))  # warm up
        before = cpu_seconds(server.pid)
        asyncio.run(load(port, connections, requests))
        return (cpu_seconds(server.pid) - before) / (connections * requests) * 1e6
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"plain": [], "guarded": []}
    for _ in range(args.rounds):
        for protocol, figures in results.items():
            figures.append(one_round(protocol, args.connections, args.requests))
    for protocol, figures in results.items():
        print(f"{protocol:8} server CPU µs/request: mean {sum(figures) / len(figures):.1f}, "
              f"runs {', '.join(f'{f:.1f}' for f in figures)}")


if __name__ == "__main__":
    main()
