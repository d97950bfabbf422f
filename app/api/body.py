"""Reading a request body under a size limit (what every front-end and the admin API share)."""

from __future__ import annotations

from starlette.types import Receive

from app.errors import InvalidRequest, PayloadTooLarge


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Bad Content-Length header.")
        if int(declared) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = bytearray(body)
    while message.get("more_body", False):
        message = await receive()
        parts += message.get("body", b"")
        if len(parts) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    return bytes(parts)
