"""The lines of a batch's output and error files (OpenAI's format), and the ids they carry.

An output line: ``{"id": "batch_req_…", "custom_id", "response": {"status_code": 200, "request_id",
"body": <chat.completion>}, "error": null}``. An error line has ``error: {"code", "message"}`` and
the upstream's answer in ``response`` when there was one (else null).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import orjson

from app.errors import KimiPoolError


def new_id(prefix: str) -> str:
    """``file-``, ``batch_`` or ``batch_req_`` and 24 random hex digits."""
    return prefix + secrets.token_hex(12)


def output_line(custom_id: str, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def error_line(custom_id: str | None, code: str, message: str, *, error: KimiPoolError | None = None,
               request_id: str | None = None) -> dict[str, Any]:
    """A request that failed: with ``error``, the answer it got (status, OpenAI error body)."""
    response = None
    if error is not None:
        response = {"status_code": error.status, "request_id": request_id, "body": error.body()}
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response,
            "error": {"code": code, "message": message}}


def failed_line(custom_id: str, error: KimiPoolError, request_id: str) -> dict[str, Any]:
    return error_line(custom_id, error.code or error.type, error.message, error=error, request_id=request_id)


def jsonl(lines: Iterable[Any]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)
