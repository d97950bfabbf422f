"""An open gateway (no master key, no client key) answers loopback only: a ``Host`` that is not a loopback
name and a browser ``Origin`` that is not a loopback page get a 403, on every route, the chat hot path
included. A key closes the gateway, at runtime too, and then CORS is open to every origin again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli import run
from tests.api.test_errors import assert_error
from tests.conftest import Stack, create_client_key, run_stack

MODEL = "kimi-k2-0905-preview"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "spend the pool"}]}
FOREIGN_HOSTS = ["evil.example", "evil.example:8088", "127.evil.example", "127.0.0.1.nip.io", "localhost.evil",
                 "[::2]:8088", "10.0.0.1", "[::1", "127.0.0.1:80x"]
LOOPBACK_HOSTS = ["localhost", "LOCALHOST:8088", "127.0.0.1", "127.0.0.2:9", "127.255.255.254:8088", "[::1]",
                  "[::1]:8088"]
FOREIGN_ORIGINS = ["https://evil.example", "http://127.evil.example", "null", "http://localhost.evil:3000",
                   "file://", "ftp://localhost", "http://[::2]"]
LOOPBACK_ORIGINS = ["http://localhost:3000", "https://127.0.0.1", "http://[::1]:5173", "http://127.1.2.3:80"]


@pytest.fixture
async def stack(tmp_path: Path) -> Any:
    async with run_stack(tmp_path, settings={"master_key": None}) as stack:
        assert stack.gateway.auth.open
        yield stack


def chat(http: httpx.AsyncClient, **headers: str) -> Any:
    return http.post("/v1/chat/completions", json=CHAT, headers=headers)


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
async def test_an_open_gateway_refuses_a_host_that_is_not_loopback(stack: Stack, host: str) -> None:
    async with stack.http() as http:
        for response in (await chat(http, Host=host), await http.get("/v1/models", headers={"Host": host}),
                         await http.get("/v1/pool/status", headers={"Host": host}),
                         await http.get("/dashboard", headers={"Host": host})):
            assert_error(response, 403, "permission_error", code="host_not_allowed")
            message = response.json()["error"]["message"]
            assert "loopback" in message and "127.0.0.1" in message and "keys create" in message
    assert stack.emulator.snapshot()["totals"]["requests"] == 0, "nothing reached an upstream"


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
async def test_an_open_gateway_answers_loopback_names_on_any_port(stack: Stack, host: str) -> None:
    async with stack.http() as http:
        assert (await http.get("/v1/models", headers={"Host": host})).status_code == 200
        assert (await chat(http, Host=host)).status_code == 200


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
async def test_an_open_gateway_refuses_browsers_on_other_origins_preflight_included(stack: Stack,
                                                                                   origin: str) -> None:
    async with stack.http() as http:
        preflight = await http.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert_error(preflight, 403, "permission_error", code="origin_not_allowed")
        assert "access-control-allow-origin" not in preflight.headers
        for response in (await chat(http, Origin=origin), await http.get("/v1/models", headers={"Origin": origin})):
            assert_error(response, 403, "permission_error", code="origin_not_allowed")
            assert "access-control-allow-origin" not in response.headers
    assert stack.emulator.snapshot()["totals"]["requests"] == 0


@pytest.mark.parametrize("origin", LOOPBACK_ORIGINS)
async def test_an_open_gateway_lets_loopback_pages_call_it(stack: Stack, origin: str) -> None:
    async with stack.http() as http:
        preflight = await http.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"]
        answer = await chat(http, Origin=origin)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"]


async def test_a_client_key_closes_the_gateway_at_runtime_and_opens_cors_to_every_origin(
        stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    async with stack.http() as http:
        assert (await chat(http, Origin="https://chat.example")).status_code == 403
        key = await create_client_key(stack, "ui", capsys)
        assert not stack.gateway.auth.open
        auth = {"Authorization": f"Bearer {key}"}
        answer = await chat(http, Origin="https://chat.example", Host="gateway.example", **auth)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
        preflight = await http.options("/v1/models", headers={"Origin": "https://chat.example",
                                                              "Access-Control-Request-Method": "GET"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
        assert_error(await chat(http, Host="gateway.example"), 401, "authentication_error")


def test_serve_refuses_a_host_that_only_starts_like_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("KIMI_POOL_MASTER_KEY", "API_MASTER_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert run(["--db", f"sqlite+aiosqlite:///{tmp_path}/k.db", "serve", "--host", "127.evil.example"]) == 1
    assert "refusing to listen on 127.evil.example without a key" in capsys.readouterr().err
