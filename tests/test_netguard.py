"""``app.netguard`` against real servers and raw sockets: a head too large gets 431, a connection that
sends no whole head in time is closed, connections beyond the cap get 503 at once, and meanwhile
``/healthz`` answers at its usual pace. The ``kimi-pool serve`` tests show the flags wired through
(also with ``--workers 2``); the in-process ones pin down what the limits count."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from app.config import Settings
from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from app.main import create_app
from app.netguard import NetLimits, connection_cap, http_protocol
from tests.conftest import MASTER_KEY, accounts_toml, gateway_process, serve

FAST_MS = 100.0


def connect(url: str) -> socket.socket:
    """A raw TCP connection to the server; the timeout only guards the test against hanging."""
    where = urlsplit(url)
    assert where.hostname is not None and where.port is not None
    return socket.create_connection((where.hostname, where.port), timeout=30)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends, up to its FIN (a blocking read: it returns when the server closes)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the server may stop reading half way (it answers, then drops the rest, then closes)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def error_of(answer: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    """The status, headers and OpenAI error object of one raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, orjson.loads(body)["error"]


async def healthz_ms(http: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    reply = await http.get("/healthz")
    assert reply.status_code == 200
    return (time.perf_counter() - started) * 1000.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def serve_process(tmp_path: Path, *args: str, ready: str = "Uvicorn running on",
                        ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, list[str]]]:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url, \
            gateway_process(tmp_path, emulator_url, *args, ready=ready) as (process, url, log):
        yield process, url, log


# --- kimi-pool serve -------------------------------------------------------------------------------


async def test_a_huge_head_an_idle_and_a_slowloris_connection_end_while_healthz_stays_fast(tmp_path: Path) -> None:
    async with serve_process(tmp_path, "--header-timeout", "0.5", "--max-header-bytes", "16384") as (
            process, url, log), httpx.AsyncClient(base_url=url) as http:
        await healthz_ms(http)  # warm: the first request loads what every later one uses
        rss_before = await asyncio.to_thread(rss_kib, process.pid)
        idle = connect(url)
        idle_since = time.perf_counter()
        half = connect(url)  # most of a head under the limit, and no more
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 12_000)
        slow = connect(url)  # half a request line, then a byte now and then
        slow.sendall(b"GET /healthz?pad=")
        slow_since = time.perf_counter()

        huge = connect(url)  # an 8 MiB header, sent meanwhile
        sending = asyncio.ensure_future(asyncio.to_thread(
            send_quietly, huge, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20)))

        timings = []
        while not select.select([slow], [], [], 0)[0]:  # until the server answers the slow one
            timings.append(await healthz_ms(http))
            slow.send(b"p")
            assert time.perf_counter() - slow_since < 10, "the slowloris connection was never ended"
        timings.sort()
        assert len(timings) >= 2 and timings[len(timings) * 9 // 10] < FAST_MS and timings[-1] < 1000, timings

        await sending
        status, _, error = error_of(await asyncio.to_thread(read_to_end, huge))
        assert status == 431 and error["code"] == "request_header_fields_too_large" and "16384" in str(error["message"])
        grown = await asyncio.to_thread(rss_kib, process.pid) - rss_before
        assert grown < 4096, f"an 8 MiB head took {grown} KiB of the server's memory"

        status, _, error = error_of(await asyncio.to_thread(read_to_end, slow))
        assert time.perf_counter() - slow_since >= 0.5
        assert status == 408 and error["code"] == "request_timeout"
        assert await asyncio.to_thread(read_to_end, idle) == b"", "an idle connection ends quietly"
        assert time.perf_counter() - idle_since >= 0.5
        status, _, error = error_of(await asyncio.to_thread(read_to_end, half))
        assert status == 408

        await healthz_ms(http)  # and serves as before
    assert "Traceback" not in "".join(log)


async def test_connections_beyond_the_cap_get_503_at_once_until_there_is_room(tmp_path: Path) -> None:
    async with serve_process(tmp_path, "--max-connections", "4", "--header-timeout", "0.5") as (_, url, log):
        idle = [connect(url) for _ in range(4)]
        status, headers, error = error_of(await asyncio.to_thread(read_to_end, connect(url)))
        assert status == 503 and headers["retry-after"] == "1" and error["code"] == "too_many_connections"
        async with httpx.AsyncClient(base_url=url) as http:
            busy = await http.get("/healthz")
            assert busy.status_code == 503 and busy.json()["error"]["type"] == "service_unavailable"

        for sock in idle:  # the header timeout ends them; then there is room again
            assert await asyncio.to_thread(read_to_end, sock) == b""
        async with httpx.AsyncClient(base_url=url) as http:
            await healthz_ms(http)
    assert "Traceback" not in "".join(log)


async def test_workers_cap_heads_too_and_the_open_files_limit_is_raised(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # what the server inherits
    try:
        starting = serve_process(tmp_path, "--workers", "2", ready="kimi-pool ready: 2 workers")
        process, url, log = await starting.__aenter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = await asyncio.to_thread(Path(f"/proc/{process.pid}/limits").read_text)
        assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == \
            [[str(hard), str(hard)]], "the soft limit was raised to the hard one"

        socks = [connect(url) for _ in range(6)]  # the kernel spreads them over both workers
        for sock in socks:  # the default limit, 64 KiB
            await asyncio.to_thread(send_quietly, sock, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20))
        for sock in socks:
            status, _, error = error_of(await asyncio.to_thread(read_to_end, sock))
            assert status == 431 and "65536" in str(error["message"])
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).json()["workers"] == {"wanted": 2, "serving": 2}
    finally:
        await starting.__aexit__(None, None, None)
    assert "Traceback" not in "".join(log)


# --- what the limits count (the gateway in this process, on the guarded protocol) --------------------


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, limits: NetLimits, **config: Any) -> AsyncIterator[tuple[str, int]]:
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url:
        toml = tmp_path / "accounts.toml"
        toml.write_text(accounts_toml(emulator_url, ["sk-emu-0001"]))
        app = create_app(Settings(db_url=f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db", master_key=MASTER_KEY,
                                  accounts_file=toml))
        async with serve(app, http=http_protocol(limits), **config) as url:
            where = urlsplit(url)
            assert where.hostname is not None and where.port is not None
            yield where.hostname, where.port


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response of a keep-alive connection: its status and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return int(head.split()[1]), await reader.readexactly(length)


async def test_the_head_limit_counts_the_head_and_not_the_body(tmp_path: Path) -> None:
    async with gateway(tmp_path, NetLimits(max_header_bytes=8192)) as (host, port):
        body = json.dumps({"model": "kimi-k2-0905-preview",
                           "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + MASTER_KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)  # one write: head and 1 MiB of body
        status, reply = await answer(reader)
        assert status == 200 and orjson.loads(reply)["choices"][0]["message"]["content"]

        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 8000 + b"\r\n\r\n")  # just under
        assert (await answer(reader))[0] == 200

        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 20_000 + b"\r\n\r\n")  # whole, over
        status, _, error = error_of(b"HTTP/1.1" + (await reader.read()).partition(b"HTTP/1.1")[2])
        assert status == 431 and error["code"] == "request_header_fields_too_large"
        writer.close()


async def test_the_head_timeout_runs_from_the_end_of_the_previous_response(tmp_path: Path) -> None:
    async with gateway(tmp_path, NetLimits(header_timeout=0.3), timeout_keep_alive=1) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)  # two pipelined requests: both answered
        assert [(await answer(reader))[0] for _ in range(2)] == [200, 200]
        answered = time.perf_counter()
        writer.write(b"GET /hea")
        status, _, error = error_of(await reader.read())
        assert status == 408 and error["code"] == "request_timeout"  # not the keep-alive timeout's quiet close
        assert time.perf_counter() - answered >= 0.3
        writer.close()

        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await answer(reader))[0] == 200
        answered = time.perf_counter()
        assert await reader.read() == b"", "a connection idle after its response ends quietly"
        assert time.perf_counter() - answered >= 1.0, "by uvicorn's keep-alive timeout, as before"
        writer.close()


def test_the_connection_cap_fits_the_open_files_limit() -> None:
    assert connection_cap(10_000, 1_048_576) == 10_000
    assert connection_cap(10_000, 4096) == 1984, "half of what is left after the process's own files"
    assert connection_cap(10_000, resource.RLIM_INFINITY) == 10_000


def test_limits_out_of_range_end_serve_in_one_line(tmp_path: Path) -> None:
    for flag, value in (("--max-header-bytes", "100"), ("--header-timeout", "0"), ("--max-connections", "0")):
        done = subprocess.run([sys.executable, "-m", "app", "--db", f"sqlite+aiosqlite:///{tmp_path}/k.db", "serve",
                               flag, value], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr and flag in done.stderr, done.stderr
