"""``/v1/files``: the OpenAI Files API, for batch input files and the output files batches write.

Uploads are ``multipart/form-data`` with ``file``, ``purpose=batch`` and optionally
``expires_after[anchor]`` and ``expires_after[seconds]`` (what ``client.files.create`` sends); a file
over ``max_file_bytes`` is refused with 413, before it is read whole when the request says its
length, and as soon as it passes the limit when it does not; one beyond its key's caps (files kept,
bytes kept) with 400 and a code naming the cap. A client key sees and manages its own files only;
the master key sees all.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson
from starlette.datastructures import FormData, UploadFile
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive

from app.api.admin.base import whole
from app.api.state import Gateway
from app.batch.objects import file_object, list_object
from app.batch.service import BatchService
from app.errors import InvalidRequest, PayloadTooLarge

UPLOAD_OVERHEAD = 1 << 20
"""Bytes a multipart upload may carry beyond its file: boundaries, part headers, the other fields."""
MAX_LIST = 10_000


def caller(request: Request) -> tuple[BatchService, str | None]:
    """The files and batches service, and who is calling (authenticated)."""
    gateway: Gateway = request.app.state.gateway
    owner = gateway.auth.authenticate(request.headers)
    batches: BatchService = request.app.state.batches
    return batches, owner


def reply(data: object) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that refuses a body growing past ``limit`` bytes."""
    seen = 0

    async def limited() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"The upload is larger than the file size limit of {limit - UPLOAD_OVERHEAD} "
                                  "bytes.", param="file")
        return message

    return limited


class Files(HTTPEndpoint):
    async def post(self, request: Request) -> Response:
        """Upload a file (multipart: ``file``, ``purpose``)."""
        batches, owner = caller(request)
        limit = batches.max_file_bytes + UPLOAD_OVERHEAD
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            batches.check_size(int(declared))
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise InvalidRequest("Upload the file as multipart/form-data with the fields 'file' and 'purpose'.")
        async with Request(request.scope, _limited(request.receive, limit)).form(max_files=1, max_fields=16) as form:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("'file' is required: the file to upload.", param="file")
            if upload.size is not None:
                batches.check_size(upload.size)
            content = await upload.read()
            row = await batches.add_file(owner, filename=upload.filename or "upload.jsonl", purpose=purpose,
                                         content=content, expires_after=_expires_after(form))
        return reply(file_object(row))

    async def get(self, request: Request) -> Response:
        """The caller's files, newest first (``order=asc``: oldest); ``purpose``, ``limit``, ``after``."""
        batches, owner = caller(request)
        params = request.query_params
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest(f"'order' must be asc or desc, not {order!r}.", param="order")
        rows, more = await batches.files(owner, limit=whole(params, "limit", MAX_LIST, maximum=MAX_LIST),
                                         after=params.get("after"), purpose=params.get("purpose"),
                                         descending=order == "desc")
        return reply(list_object([file_object(row) for row in rows], more))


def _expires_after(form: FormData) -> dict[str, Any] | None:
    """The ``expires_after`` policy of a multipart upload (its fields ``expires_after[anchor]`` and
    ``expires_after[seconds]``), or a JSON object in one ``expires_after`` field; None if not given."""
    whole_field = form.get("expires_after")
    if isinstance(whole_field, str):
        try:
            policy = orjson.loads(whole_field)
        except orjson.JSONDecodeError:
            raise InvalidRequest("'expires_after' must be a JSON object.", param="expires_after") from None
        return policy if isinstance(policy, dict) else {"anchor": policy}
    parts = {name: form.get(f"expires_after[{name}]") for name in ("anchor", "seconds")}
    if all(value is None for value in parts.values()):
        return None
    return parts


class File(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        batches, owner = caller(request)
        return reply(file_object(await batches.file(owner, request.path_params["file_id"])))

    async def delete(self, request: Request) -> Response:
        batches, owner = caller(request)
        file_id = request.path_params["file_id"]
        await batches.delete_file(owner, file_id)
        return reply({"id": file_id, "object": "file", "deleted": True})


async def file_content(request: Request) -> Response:
    batches, owner = caller(request)
    row, content = await batches.file_content(owner, request.path_params["file_id"])
    return Response(content, media_type="application/octet-stream",
                    headers={"Content-Disposition": content_disposition(row.filename)})


def content_disposition(filename: str) -> str:
    """``attachment`` with the name as RFC 6266 gives it: ``filename*=UTF-8''…`` (percent-encoded, any
    name) after a plain ``filename="…"`` for old clients (ASCII, with ``"``, ``\\``, control characters
    and anything else outside printable ASCII replaced by ``_``)."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename) or "file"
    encoded = quote(filename, safe="")
    if encoded == filename:
        return f'attachment; filename="{fallback}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def file_routes() -> list[Route]:
    return [
        Route("/v1/files", Files),
        Route("/v1/files/{file_id}", File),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
    ]
