"""What the batch tests share: input files and reading results."""

from __future__ import annotations

from typing import Any

import openai
import orjson

MODEL = "kimi-k2-0905-preview"


def request_line(custom_id: str, text: str = "hello", *, model: str = MODEL, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **body}}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines)


def requests(count: int, prefix: str = "req") -> list[dict[str, Any]]:
    return [request_line(f"{prefix}-{i:04d}", f"question {i}") for i in range(count)]


async def upload(client: openai.AsyncOpenAI, lines: list[Any]) -> str:
    return (await client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")).id


async def start(client: openai.AsyncOpenAI, lines: list[Any], window: str = "24h") -> str:
    file_id = await upload(client, lines)
    batch = await client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                        completion_window=window)  # type: ignore[arg-type]
    assert batch.status == "validating"
    return batch.id


async def read_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [orjson.loads(line) for line in content.content.splitlines()]
