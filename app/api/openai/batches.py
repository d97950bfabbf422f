"""``/v1/batches``: the OpenAI Batch API (``client.batches.create/retrieve/list/cancel``).

A batch reads an uploaded JSONL file of ``/v1/chat/completions`` requests; the runner inside the
server drains it through the pool and writes output and error files (``/v1/files``). A client key
sees and cancels its own batches only; the master key, all of them.
"""

from __future__ import annotations

from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.api.admin.base import whole
from app.api.body import read_body
from app.api.openai.files import caller, reply
from app.api.openai.schema import parse_json
from app.batch.objects import batch_object, list_object
from app.batch.runner import BatchRunner
from app.errors import InvalidRequest

MAX_BODY_BYTES = 64 * 1024
MAX_LIST = 100


class Batches(HTTPEndpoint):
    async def post(self, request: Request) -> Response:
        """Create a batch: ``input_file_id``, ``endpoint``, ``completion_window`` (``24h``), ``metadata``,
        ``output_expires_after`` (when its output and error files expire)."""
        batches, owner = caller(request)
        declared = request.headers.get("content-length")
        body = parse_json(await read_body(request.receive, None if declared is None else declared.encode("latin-1"),
                                          MAX_BODY_BYTES))
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        row = await batches.create(owner, input_file_id=body.get("input_file_id"), endpoint=body.get("endpoint"),
                                   completion_window=body.get("completion_window"), metadata=body.get("metadata"),
                                   output_expires_after=body.get("output_expires_after"))
        return reply(batch_object(row))

    async def get(self, request: Request) -> Response:
        """The caller's batches, newest first; ``limit`` (20), ``after``."""
        batches, owner = caller(request)
        params = request.query_params
        rows, more = await batches.batches(owner, limit=whole(params, "limit", 20, maximum=MAX_LIST),
                                           after=params.get("after"))
        return reply(list_object([batch_object(row) for row in rows], more))


async def get_batch(request: Request) -> Response:
    """The batch, with a kimi-pool extension: ``kimi_pool.accounts``, the requests each account answered
    (since the server started), which ``kimi-pool batch run`` shows as each account's share."""
    batches, owner = caller(request)
    body = batch_object(await batches.batch(owner, request.path_params["batch_id"]))
    runner: BatchRunner = request.app.state.batch_runner
    body["kimi_pool"] = {"accounts": runner.served(body["id"])}
    return reply(body)


async def cancel_batch(request: Request) -> Response:
    batches, owner = caller(request)
    return reply(batch_object(await batches.cancel(owner, request.path_params["batch_id"])))


def batch_routes() -> list[Route]:
    return [
        Route("/v1/batches", Batches),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
    ]
