"""An upstream error that quotes a credential never passes it on: not to the client, not into an
account's reason (``/v1/pool/status``, the CLI, the database), not into the log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from app.cli import run
from app.emulator.moonshot import MoonshotEmulatorConfig
from tests.conftest import MASTER_KEY, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
API_KEY = "sk-Leaked0123456789abcdefXYZ"
JWT = "eyJhbGciOiJIUzUxMiJ9.eyJ1c2VyX2lkIjoiY2g0MmxlYWtlZCJ9.U2lnbmF0dXJlT2ZUaGVMZWFrZWRUb2tlbg"
CLIENT_KEY = "kp-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
BEARER = "Bearer opaque.session.value"
QUOTED = f"key {API_KEY} with token {JWT}; client {CLIENT_KEY}; header Authorization: {BEARER}"
LEAKS = (API_KEY[:10], JWT[:12], JWT.split(".")[2], CLIENT_KEY[:10], "opaque.session.value")


def database_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.glob("kimi-pool.db*") if p.is_file())


def assert_clean(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, f"{leak} leaked into: {text}"


async def test_credentials_quoted_by_upstream_errors_are_redacted_everywhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kimi_pool")
    async with run_stack(tmp_path, emulator=MoonshotEmulatorConfig.simple(keys=2)) as stack, \
            stack.http() as http:
        stack.emulator.script("sk-emu-0001", [{"kind": "status", "status": 401, "type": "invalid_authentication_error",
                                               "message": f"Invalid Authentication: {QUOTED}"}])
        stack.emulator.script("sk-emu-0002", [{"kind": "status", "status": 500, "message": f"boom: {QUOTED}"}])
        failed = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO}, headers=AUTH)
        assert failed.status_code == 503
        message = failed.json()["error"]["message"]
        assert "Last upstream error" in message and "sk-[REDACTED]" in message and "[REDACTED]" in message
        assert_clean(failed.text)

        stack.emulator.script("sk-emu-0002", [{"kind": "status", "status": 400, "type": "invalid_request_error",
                                               "message": f"bad input: {QUOTED}"}])
        refused = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO}, headers=AUTH)
        assert refused.status_code == 400 and "bad input" in refused.text, refused.text
        assert_clean(refused.text)

        status = (await http.get("/v1/pool/status", headers=AUTH)).json()
        dead = next(a for a in status["accounts"] if a["name"] == "acct-1")
        assert dead["state"] == "auth_dead" and "Invalid Authentication" in dead["reason"]
        assert_clean(str(status))

        await stack.app.state.writer.flush()
        assert await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "list", "--json"]) == 0
        listed = capsys.readouterr().out
        assert "Invalid Authentication" in listed
        assert_clean(listed)
        stored = await asyncio.to_thread(database_bytes, tmp_path)
        assert b"Invalid Authentication" in stored
        assert_clean(stored.decode("latin-1"))
    assert_clean("\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records))


async def test_an_error_in_a_stream_reaches_the_client_redacted(tmp_path: Path) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"]) as stack, stack.http() as http:
        stack.emulator.script("sk-emu-0001", [{"kind": "error_chunk_after", "chunks": 2,
                                               "message": f"stream broke: {QUOTED}"}])
        response = await http.post("/v1/chat/completions", headers=AUTH,
                                   json={"model": MODEL, "messages": HELLO, "stream": True})
        assert "stream broke: key sk-[REDACTED] with token [REDACTED]" in response.text, response.text
        assert_clean(response.text)
