"""Shared test support: run a real ASGI app under uvicorn on 127.0.0.1, in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, **config: Any) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yield its base URL (``http://127.0.0.1:PORT``). ``config``:
    more ``uvicorn.Config`` settings (e.g. ``http``, the protocol class).

    The listening socket is bound and listening before the server task starts, so a client may
    connect at once: the kernel queues the connection until uvicorn (after lifespan startup)
    accepts it. Nothing polls or sleeps.
    """
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so (else ~40 ms per request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                                           **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# --- the whole stack: Moonshot emulator + kimi-pool, both under uvicorn, sharing one manual clock --


import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402

from app.api.front import FrontDoor  # noqa: E402
from app.api.state import Gateway as GatewayState  # noqa: E402
from app.clock import ManualClock  # noqa: E402
from app.config import Settings  # noqa: E402
from app.emulator.moonshot import MoonshotEmulator, MoonshotEmulatorConfig, create_moonshot_emulator  # noqa: E402
from app.main import create_app  # noqa: E402

MASTER_KEY = "test-master-key-0123456789"


def accounts_toml(emulator_url: str, keys: list[str], **extra: Any) -> str:
    lines = []
    for i, key in enumerate(keys, start=1):
        lines += ["[[accounts]]", f'name = "acct-{i}"', 'kind = "moonshot"', f'api_key = "{key}"',
                  f'base_url = "{emulator_url}/v1"']
        lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
        lines.append("")
    return "\n".join(lines)


@dataclasses.dataclass
class Gateway:
    """kimi-pool under uvicorn, configured from an accounts.toml: for stacks of any upstream kinds."""

    url: str
    app: FrontDoor
    clock: ManualClock
    db_url: str
    clients: list[openai.AsyncOpenAI] = dataclasses.field(default_factory=list)

    @property
    def gateway(self) -> GatewayState:
        return self.app.state.gateway  # type: ignore[no-any-return]

    def client(self, api_key: str = MASTER_KEY, **kw: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)
        self.clients.append(client)
        return client


@dataclasses.dataclass(kw_only=True)
class Stack(Gateway):
    """The Moonshot emulator and kimi-pool (``run_stack``)."""

    emulator_url: str
    emulator: MoonshotEmulator
    tmp_path: Path

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)


@contextlib.asynccontextmanager
async def run_gateway(tmp_path: Path, accounts: str, *, clock: ManualClock,
                      settings: dict[str, Any] | None = None) -> AsyncIterator[Gateway]:
    """kimi-pool with the accounts (and aliases) of the TOML text ``accounts``; lifespan has run."""
    toml = tmp_path / "accounts.toml"
    toml.write_text(accounts)
    db_url = f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db"
    base = {"db_url": db_url, "master_key": MASTER_KEY, "accounts_file": toml}
    app = create_app(Settings(**{**base, **(settings or {})}), clock=clock)
    async with serve(app) as url:
        async with httpx.AsyncClient() as http:
            (await http.get(url + "/healthz")).raise_for_status()
        gateway = Gateway(url, app, clock, db_url)
        try:
            yield gateway
        finally:
            for client in gateway.clients:
                await client.close()


@contextlib.asynccontextmanager
async def run_stack(tmp_path: Path, *, keys: list[str] | None = None,
                    emulator: MoonshotEmulatorConfig | None = None, clock: ManualClock | None = None,
                    settings: dict[str, Any] | None = None, account_extra: dict[str, Any] | None = None,
                    ) -> AsyncIterator[Stack]:
    """Emulator with 3 organisations, kimi-pool with one account per key (``acct-1``…) from a TOML file."""
    clock = clock or ManualClock()
    config = emulator or MoonshotEmulatorConfig.simple(keys=3)
    emulator_app = create_moonshot_emulator(config, clock=clock)
    async with serve(emulator_app) as emulator_url:
        toml = accounts_toml(emulator_url, keys or sorted(config.keys), **(account_extra or {}))
        async with run_gateway(tmp_path, toml, clock=clock, settings=settings) as gateway:
            stack = Stack(url=gateway.url, app=gateway.app, clock=clock, db_url=gateway.db_url,
                          clients=gateway.clients, emulator_url=emulator_url, emulator=emulator_app.state.emulator,
                          tmp_path=tmp_path)
            yield stack


async def create_client_key(stack: Stack, name: str, capsys: Any) -> str:
    """Create a client key with the CLI (which prints it once) and let the server load it."""
    import re

    from app.cli import run

    assert await asyncio.to_thread(run, ["--db", stack.db_url, "keys", "create", name]) == 0
    found = re.search(r"kp-[A-Za-z0-9_-]{20,}", capsys.readouterr().out)
    assert found is not None
    await reload(stack)
    return found.group(0)


async def reload(stack: Gateway) -> None:
    """Let the server's periodic sync pick up what the CLI wrote, by moving the clock, not sleeping."""
    sync = stack.app.state.sync
    generation = sync.generation
    stack.clock.advance(stack.gateway.settings.sync_interval)
    await sync.wait_generation(generation + 1)


# --- a real ``kimi-pool serve`` process -------------------------------------------------------------


import os  # noqa: E402
import sys  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_until(stream: asyncio.StreamReader, marker: str, seen: list[str]) -> None:
    """Read the server's log lines until one contains ``marker`` (no polling: each read waits)."""
    while True:
        line = (await stream.readline()).decode(errors="replace")
        if not line:
            raise AssertionError(f"the server's log ended before {marker!r}:\n{''.join(seen)}")
        seen.append(line)
        if marker in line:
            return


@contextlib.asynccontextmanager
async def gateway_process(tmp_path: Path, emulator_url: str, *args: str, accounts: str | None = None,
                          ready: str = "Application startup complete", master_key: str | None = MASTER_KEY,
                          ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, list[str]]]:
    """``kimi-pool serve ARGS`` in a child process with ``accounts`` (default: one account on the
    emulator); yields the process, its URL and the log lines read so far (up to ``ready``).
    ``master_key`` None: an open gateway (no key in its environment)."""
    toml = tmp_path / "accounts.toml"
    toml.write_text(accounts if accounts is not None else
                    f'[[accounts]]\nname = "acct-1"\nkind = "moonshot"\napi_key = "sk-emu-0001"\n'
                    f'base_url = "{emulator_url}/v1"\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("KIMI_POOL_MASTER_KEY", "API_MASTER_KEY")}
    if master_key is not None:
        env["KIMI_POOL_MASTER_KEY"] = master_key
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "--db", f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db", "serve",
        "--port", str(port), "--accounts", str(toml), *args,
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, env=env)
    assert process.stderr is not None
    log: list[str] = []
    try:
        await asyncio.wait_for(read_until(process.stderr, ready, log), 60)
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
