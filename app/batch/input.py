"""Read a batch's input file: JSONL, one request per line.

Each line is ``{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
with a body the chat endpoint would take (``parse_chat_request``) for a model the pool serves. A line
that is not is *refused*, with a code and a message that names the line: it fails that request
only (it goes to the error file), not the job. A file that is not UTF-8 text is refused whole.
Blank lines are skipped; lines are numbered as in the file, from 1.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import orjson

from app.api.openai.schema import parse_chat_request
from app.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class InputLine:
    line: int
    custom_id: str | None
    body: dict[str, Any] | None
    """The request's body; None when the line was refused."""
    code: str | None = None
    message: str | None = None
    param: str | None = None

    @property
    def ok(self) -> bool:
        return self.body is not None

    def error(self) -> dict[str, Any]:
        """The refusal as an entry of OpenAI's batch ``errors.data``."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


def parse_input(content: bytes, *, endpoint: str, models: Container[str]) -> list[InputLine]:
    """Every non-blank line, accepted or refused. ``InvalidRequest`` if the file is not UTF-8 text."""
    try:
        text = content.decode("utf-8-sig")  # a byte order mark is no part of the first line
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The input file is not UTF-8 text (invalid byte at offset {exc.start}).",
                             code="invalid_file_encoding") from None
    seen: set[str] = set()
    lines = []
    for number, raw in enumerate(text.split("\n"), start=1):
        if raw.strip():
            lines.append(_read_line(number, raw, endpoint, models, seen))
    return lines


def _read_line(number: int, raw: str, endpoint: str, models: Container[str], seen: set[str]) -> InputLine:
    def refuse(code: str, message: str, param: str | None = None, custom_id: str | None = None) -> InputLine:
        return InputLine(number, custom_id, None, code, f"Line {number}: {message}", param)

    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return refuse("invalid_json_line", f"not valid JSON ({exc}).")
    if not isinstance(request, dict):
        return refuse("invalid_json_line", "a request line must be a JSON object.")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return refuse("missing_custom_id", "'custom_id' is required and must be a non-empty string.", "custom_id")
    if custom_id in seen:
        return refuse("duplicate_custom_id", f"the custom_id {custom_id!r} is used by an earlier line; each request "
                      "needs its own.", "custom_id", custom_id)
    seen.add(custom_id)
    if request.get("method") != "POST":
        return refuse("invalid_method", f"'method' must be POST, not {request.get('method')!r}.", "method", custom_id)
    if request.get("url") != endpoint:
        return refuse("invalid_url", f"'url' must be the batch's endpoint {endpoint}, not {request.get('url')!r}.",
                      "url", custom_id)
    body = request.get("body")
    try:
        chat = parse_chat_request(body)
    except InvalidRequest as exc:
        return refuse("invalid_request", exc.message, f"body.{exc.param}" if exc.param else "body", custom_id)
    if chat.model not in models:
        return refuse("model_not_found", f"the model {chat.model!r} does not exist or no enabled account serves it.",
                      "body.model", custom_id)
    assert isinstance(body, dict)
    return InputLine(number, custom_id, body)
