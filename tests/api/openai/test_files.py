"""``/v1/files`` through the real gateway, driven by the openai SDK (and raw HTTP for what it cannot send)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import openai
import pytest

from tests.conftest import MASTER_KEY, create_client_key, run_stack

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


async def test_an_upload_is_stored_and_given_back_byte_for_byte(tmp_path: Path) -> None:
    content = '{"custom_id": "ü", "note": "not checked until a batch reads it"}\n'.encode()
    async with run_stack(tmp_path) as stack:
        client = stack.client()
        uploaded = await client.files.create(file=("in.jsonl", content), purpose="batch")
        assert uploaded.id.startswith("file-") and uploaded.bytes == len(content) and uploaded.status == "processed"
        assert (await client.files.content(uploaded.id)).content == content
        assert (await client.files.retrieve(uploaded.id)).model_dump() == uploaded.model_dump()


@pytest.mark.parametrize("name", ["données 数据.jsonl", 'say "hi"\\.jsonl', "line\r\nbreak.jsonl", "in.jsonl"])
async def test_any_file_name_comes_back_in_an_rfc_6266_content_disposition(tmp_path: Path, name: str) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        uploaded = await stack.client().files.create(file=(name, b"{}\n"), purpose="batch")
        for _ in range(2):  # and again: nothing about the stored name breaks the file for good
            response = await http.get(f"/v1/files/{uploaded.id}/content", headers=AUTH)
            assert response.status_code == 200 and response.content == b"{}\n"
            disposition = response.headers["content-disposition"]
            fallback = re.fullmatch(r'attachment; filename="([ -~]+)"(?:; filename\*=UTF-8\'\'(\S+))?', disposition)
            assert fallback is not None, disposition
            assert '"' not in fallback.group(1) and "\\" not in fallback.group(1)
            assert unquote(fallback.group(2) or fallback.group(1)) == uploaded.filename
            if name == "données 数据.jsonl":
                assert fallback.group(1) == "donn_es __.jsonl"


async def test_a_file_over_the_size_limit_is_413(tmp_path: Path) -> None:
    async with run_stack(tmp_path, settings={"max_file_bytes": 1000}) as stack:
        client = stack.client()
        with pytest.raises(openai.APIStatusError) as refused:
            await client.files.create(file=("big.jsonl", b"x" * 1001), purpose="batch")
        assert refused.value.status_code == 413
        assert refused.value.body["code"] == "payload_too_large"  # type: ignore[index]
        assert "limit of 1000 bytes" in refused.value.message
        assert (await client.files.create(file=("ok.jsonl", b"x" * 1000), purpose="batch")).bytes == 1000
        assert [f.bytes async for f in client.files.list()] == [1000], "the refused one was not kept"


async def test_an_upload_without_a_length_is_cut_off_at_the_limit(tmp_path: Path) -> None:
    async def endless() -> AsyncIterator[bytes]:
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(10_000):
            yield b"y" * 1024  # 10 MiB, more than the limit and its allowance for the form's framing

    async with run_stack(tmp_path, settings={"max_file_bytes": 1000}) as stack, stack.http() as http:
        response = await http.post("/v1/files", content=endless(),
                                   headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


async def test_only_batch_files_are_taken_and_a_file_is_required(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        client = stack.client()
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await client.files.create(file=("a.jsonl", b"{}"), purpose="assistants")
        missing = await http.post("/v1/files", data={"purpose": "batch"}, files={"other": ("a", b"x")}, headers=AUTH)
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
        not_a_form = await http.post("/v1/files", json={"purpose": "batch"}, headers=AUTH)
        assert not_a_form.status_code == 400 and "multipart/form-data" in not_a_form.json()["error"]["message"]
        assert (await http.get("/v1/files")).status_code == 401
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve("file-000000000000000000000000")
        with pytest.raises(openai.BadRequestError, match="order"):
            await client.files.list(order="sideways")  # type: ignore[arg-type]


async def test_files_list_oldest_first_and_by_page(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        client = stack.client()
        ids = []
        for i in range(3):
            ids.append((await client.files.create(file=(f"{i}.jsonl", b"{}"), purpose="batch")).id)
            stack.clock.advance(1)
        assert [f.id async for f in client.files.list(order="asc", limit=1)] == ids
        page = await client.files.list(limit=2)
        assert [f.id for f in page.data] == ids[:0:-1] and page.has_more


# --- per-key caps and expiry ---------------------------------------------------------------------


async def test_one_key_keeps_at_most_its_files_and_bytes_and_others_are_not_held_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, settings={"max_files_per_key": 2, "max_file_bytes_per_key": 1000}) as stack:
        team_a = stack.client(await create_client_key(stack, "team-a", capsys))
        team_b = stack.client(await create_client_key(stack, "team-b", capsys))
        first = await team_a.files.create(file=("1.jsonl", b"x" * 100), purpose="batch")
        await team_a.files.create(file=("2.jsonl", b"x" * 100), purpose="batch")
        with pytest.raises(openai.BadRequestError) as refused:
            await team_a.files.create(file=("3.jsonl", b"x" * 100), purpose="batch")
        assert refused.value.body["code"] == "key_file_count_exceeded"  # type: ignore[index]
        assert "limit of 2" in refused.value.message
        assert len([f async for f in team_a.files.list()]) == 2, "the refused one was not kept"

        assert (await team_b.files.create(file=("b.jsonl", b"x" * 600), purpose="batch")).bytes == 600, \
            "another key has its own room"
        with pytest.raises(openai.BadRequestError) as too_big:
            await team_b.files.create(file=("c.jsonl", b"x" * 401), purpose="batch")
        assert too_big.value.body["code"] == "key_file_bytes_exceeded"  # type: ignore[index]
        assert (await team_b.files.create(file=("c.jsonl", b"x" * 400), purpose="batch")).bytes == 400

        await team_a.files.delete(first.id)
        assert (await team_a.files.create(file=("3.jsonl", b"x"), purpose="batch")).bytes == 1, \
            "a deleted file no longer counts"


async def test_a_file_expires_as_its_upload_says_and_then_no_longer_counts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, settings={"max_files_per_key": 1}) as stack:
        client = stack.client(await create_client_key(stack, "team-a", capsys))
        short = await client.files.create(file=("a.jsonl", b"{}"), purpose="batch",
                                          expires_after={"anchor": "created_at", "seconds": 3600})
        assert short.expires_at == short.created_at + 3600
        with pytest.raises(openai.BadRequestError, match="limit of 1"):
            await client.files.create(file=("b.jsonl", b"{}"), purpose="batch")

        stack.clock.advance(3600)
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(short.id)
        assert [f async for f in client.files.list()] == []
        kept = await client.files.create(file=("b.jsonl", b"{}"), purpose="batch")
        assert kept.expires_at == kept.created_at + 30 * 86400, "without expires_after: OpenAI's 30 days"
        await stack.app.state.file_sweeper.wait_purged(1)  # and the expired one is deleted from the database
        with sqlite3.connect(stack.tmp_path / "kimi-pool.db") as db:
            assert db.execute("SELECT id FROM files").fetchall() == [(kept.id,)]


@pytest.mark.parametrize("policy", [
    {"anchor": "created_at", "seconds": 3599},
    {"anchor": "created_at", "seconds": 30 * 86400 + 1},
    {"anchor": "last_active_at", "seconds": 3600},
    {"anchor": "created_at", "seconds": "soon"},
])
async def test_a_bad_expiry_is_refused_with_the_parameter_named(tmp_path: Path, policy: dict[str, Any]) -> None:
    async with run_stack(tmp_path) as stack:
        with pytest.raises(openai.BadRequestError) as refused:
            await stack.client().files.create(file=("a.jsonl", b"{}"), purpose="batch",
                                              expires_after=policy)  # type: ignore[arg-type]
        assert refused.value.body["param"] == "expires_after"  # type: ignore[index]
