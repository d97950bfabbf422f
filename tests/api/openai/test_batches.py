"""``/v1/batches``: what creating a batch refuses, and the completion window it honours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.batch.support import read_lines, request_line, upload
from tests.conftest import MASTER_KEY, create_client_key, run_stack


@pytest.mark.parametrize(("change", "param"), [
    ({"endpoint": "/v1/embeddings"}, "endpoint"),
    ({"completion_window": "1d"}, "completion_window"),
    ({"completion_window": "0h"}, "completion_window"),
    ({"completion_window": "721h"}, "completion_window"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input_file_id": None}, "input_file_id"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after"),
    ({"output_expires_after": 7200}, "output_expires_after"),
])
async def test_a_bad_batch_is_refused_with_the_parameter_named(tmp_path: Path, change: dict[str, Any],
                                                             param: str) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        file_id = await upload(stack.client(), [{}])
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **change}
        response = await http.post("/v1/batches", json=body, headers={"Authorization": f"Bearer {MASTER_KEY}"})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        assert (await http.get("/v1/batches", headers={"Authorization": f"Bearer {MASTER_KEY}"})).json()["data"] == []


async def test_the_input_must_be_an_existing_batch_file_and_any_window_in_hours_is_honoured(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        client = stack.client()
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                        completion_window="24h")
        file_id = await upload(client, [{}])
        batch = await client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                            completion_window="48h")  # type: ignore[arg-type]
        assert batch.expires_at == batch.created_at + 48 * 3600 and batch.completion_window == "48h"
        assert await stack.app.state.batch_runner.wait_settled(batch.id) == "failed"
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_nope")
        with pytest.raises(openai.BadRequestError, match="limit"):
            await client.batches.list(limit=101)


async def test_a_batch_s_files_expire_as_it_says_and_its_results_are_written_beyond_the_key_s_caps(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, settings={"max_files_per_key": 1}) as stack:
        client = stack.client(await create_client_key(stack, "team-a", capsys))
        input_id = await upload(client, [request_line("a"), {"custom_id": "b"}])  # one answer, one error
        batch = await client.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions",
                                            completion_window="24h",
                                            output_expires_after={"anchor": "created_at", "seconds": 7200})
        assert await stack.app.state.batch_runner.wait_settled(batch.id) == "completed"
        done = await client.batches.retrieve(batch.id)
        assert done.output_file_id and done.error_file_id, "written although the key had its one file already"
        for file_id in (done.output_file_id, done.error_file_id):
            written = await client.files.retrieve(file_id)
            assert written.expires_at == written.created_at + 7200
        assert [line["custom_id"] for line in await read_lines(client, done.output_file_id)] == ["a"]
        with pytest.raises(openai.BadRequestError, match="limit of 1"):
            await upload(client, [request_line("c")])

        stack.clock.advance(7200)
        with pytest.raises(openai.NotFoundError):
            await client.files.content(done.output_file_id)
        assert [f.id async for f in client.files.list()] == [input_id], "the input keeps its own 30 days"
