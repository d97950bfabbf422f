"""``/v1/batches``: what creating a batch refuses, and the completion window it honours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.batch.support import upload
from tests.conftest import MASTER_KEY, run_stack


@pytest.mark.parametrize(("change", "param"), [
    ({"endpoint": "/v1/embeddings"}, "endpoint"),
    ({"completion_window": "1d"}, "completion_window"),
    ({"completion_window": "0h"}, "completion_window"),
    ({"completion_window": "721h"}, "completion_window"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input_file_id": None}, "input_file_id"),
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
