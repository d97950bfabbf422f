"""``POST /v1/chat/completions``: authenticate, parse, dispatch, render (SSE or one JSON body)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.api.schema import parse_chat_request, parse_json
from app.api.sse import DONE, ChunkRenderer, SSEResponse
from app.api.state import Gateway
from app.dispatch import RequestContext
from app.errors import InvalidRequest, KimiPoolError, PayloadTooLarge
from app.upstreams.base import Completion, Event, Usage


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Bad Content-Length header.")
        if int(declared) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    return bytes(body)


async def chat_completions(request: Request) -> Response | SSEResponse:
    gateway: Gateway = request.app.state.gateway
    client = gateway.auth.authenticate(request.headers)
    chat = parse_chat_request(parse_json(await read_body(request, gateway.settings.max_body_bytes)))
    gateway.dispatcher.check_model(chat.model)
    ctx = RequestContext(request.state.request_id, client)
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(gateway.clock.time())
    if not chat.stream:
        completion = await gateway.dispatcher.complete(chat, ctx)
        body = _completion_body(completion, completion_id, created, chat.model)
        return Response(orjson.dumps(body), media_type="application/json",
                        headers={"x-kimi-pool-account": ctx.account or ""})
    events = gateway.dispatcher.stream(chat, ctx)
    first = await anext(events)  # failover happens here; an error is still a JSON answer
    renderer = ChunkRenderer(completion_id, created, chat.model)
    return SSEResponse(_frames(renderer, first, events, chat.include_usage),
                       headers={"x-kimi-pool-account": ctx.account or ""})


async def _frames(renderer: ChunkRenderer, first: Event, events: AsyncIterator[Event],
                  include_usage: bool) -> AsyncIterator[bytes]:
    yield renderer.role()
    usage: Usage | None = None
    event = first
    try:
        while True:
            if type(event) is Usage:
                usage = event
            else:
                frame = renderer.event(event)
                if frame is not None:
                    yield frame
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
    except KimiPoolError as error:
        yield renderer.error(error)
        return
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if include_usage and usage is not None:
        yield renderer.usage(usage)
    yield DONE


def _completion_body(completion: Completion, completion_id: str, created: int, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": completion.content}
    if completion.reasoning is not None:
        message["reasoning_content"] = completion.reasoning
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason, "logprobs": None}],
    }
    if completion.usage is not None:
        body["usage"] = completion.usage.as_openai()
    return body
