"""A faithful fake of the official Moonshot / Kimi Open Platform API (PROTOCOLS.md section 4).

``create_moonshot_emulator(config)`` returns a Starlette app serving

* ``POST /v1/chat/completions``: JSON or SSE, the documented check order and error bodies,
  per-organization concurrency / RPM / TPM / TPD, the global overload knob;
  thinking (``reasoning_content``), tool calls, JSON answers, ``$web_search``, prefix mode and
  cached tokens on a repeated prefix, with Kimi's rules for them (``moonshot_asks``, ``moonshot_reply``);
* ``GET /v1/models`` (with each model's traits), ``GET /v1/users/me/balance``,
  ``POST /v1/tokenizers/estimate-token-count``;
* the control routes ``/__fake/script|answers|release|state|reset|config``.

``app.state.emulator`` is the ``MoonshotEmulator`` behind it, for in-process scripting and
assertions (``script``, ``script_answers``, ``release``, ``wait_for``, ``stats``, ``snapshot``,
``recent_requests``). Time (latency, windows) comes from the injected clock, so a ``ManualClock``
makes all of it deterministic.
"""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.clock import Clock, SystemClock
from app.emulator import moonshot_wire as wire
from app.emulator.asgi import (
    EmulatorApp,
    Endpoint,
    bearer_token,
    cut_connection,
    read_body,
    send_whole,
    until_disconnect,
)
from app.emulator.control import ANY_KEY, control_routes
from app.emulator.moonshot_config import ModelInfo, MoonshotEmulatorConfig, Org, OrgLimits, default_models
from app.emulator.moonshot_prompt import scan
from app.emulator.moonshot_records import Answer, MoonshotStats, Ticket
from app.emulator.moonshot_state import OUTCOME_KINDS, MoonshotEmulator

__all__ = [
    "OUTCOME_KINDS",
    "ModelInfo",
    "MoonshotEmulator",
    "MoonshotEmulatorConfig",
    "MoonshotStats",
    "Org",
    "OrgLimits",
    "create_moonshot_emulator",
    "default_models",
]

_HELD_KINDS = ("drop_after", "error_chunk_after", "hold_after")


def _budget(emulator: MoonshotEmulator, ticket: Ticket) -> tuple[list[bytes], int, str, float, str]:
    """(token deltas, tokens to produce, finish reason, first-token delay, outcome kind)."""
    deltas = ticket.turn.deltas
    tokens = len(deltas) if ticket.max_tokens is None else min(len(deltas), ticket.max_tokens)
    finish = ticket.turn.finish_for(tokens)
    outcome = ticket.outcome
    kind = outcome.kind if outcome is not None else "ok"
    delay = outcome["seconds"] if outcome is not None and kind == "delay_first_token" \
        else emulator.config.first_token_delay
    return deltas, tokens, finish, delay, kind


async def _complete(emulator: MoonshotEmulator, ticket: Ticket, scope: Scope, receive: Receive,
                    send: Send) -> None:
    """A whole ``chat.completion`` body, after the reply's full latency."""
    _, tokens, finish, delay, kind = _budget(emulator, ticket)
    use = wire.usage(ticket.prompt_tokens, tokens, ticket.cached_tokens)
    body = wire.completion_body(ticket.who, ticket.turn.message(tokens), finish, use)
    headers = [*wire.JSON_HEADERS, *ticket.headers, (b"content-length", b"%d" % len(body))]
    latency = delay + emulator.config.chunk_interval * tokens
    result = "disconnect"

    async def deliver() -> None:
        nonlocal result
        if latency > 0:
            await emulator.clock.sleep(latency)
        if kind == "hold_after":
            await emulator.gate.hold()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if kind == "drop_after":
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            result = "dropped"
            return
        await send({"type": "http.response.body", "body": body})
        result = "completed"

    try:
        if latency > 0 or kind == "hold_after":
            await until_disconnect(receive, deliver())
        else:
            await deliver()
        if result == "dropped":
            await cut_connection(scope, receive)
    finally:
        emulator.finish(ticket, tokens, result)


async def _stream(emulator: MoonshotEmulator, ticket: Ticket, scope: Scope, receive: Receive,
                  send: Send) -> None:
    """SSE: role chunk, (reasoning,) content and tool-call chunks, final chunk with usage, ``[DONE]``."""
    deltas, tokens, finish, delay, kind = _budget(emulator, ticket)
    stop = min(ticket.outcome["chunks"], tokens) if ticket.outcome is not None and kind in _HELD_KINDS \
        else tokens
    config = emulator.config
    clock = emulator.clock
    frames = wire.Frames(ticket.who)
    sent = 0
    role_sent = False
    result = "disconnect"

    def with_role(data: bytes) -> bytes:
        nonlocal role_sent
        if role_sent:
            return data
        role_sent = True
        return frames.role() + data

    async def emit(end: int) -> None:
        nonlocal sent
        interval = config.chunk_interval
        if interval <= 0:
            if sent < end:
                data = with_role(b"".join([frames.chunk(delta) for delta in deltas[sent:end]]))
                sent = end
                await send({"type": "http.response.body", "body": data, "more_body": True})
            return
        while sent < end:
            if sent > 0:
                await clock.sleep(interval)
            data = with_role(frames.chunk(deltas[sent]))
            sent += 1
            await send({"type": "http.response.body", "body": data, "more_body": True})

    async def produce() -> None:
        nonlocal result
        headers = wire.SSE_HEADERS + ticket.headers
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if delay > 0:
            await clock.sleep(delay)
        await emit(stop)
        if kind == "drop_after":
            result = "dropped"
            return
        if kind == "error_chunk_after":
            outcome = ticket.outcome
            assert outcome is not None
            result = "error"
            event = wire.error_event(outcome["type"], outcome["message"])
            await send({"type": "http.response.body", "body": event})
            return
        if kind == "hold_after":
            await emulator.gate.hold()
            await emit(tokens)
        use = wire.usage(ticket.prompt_tokens, sent, ticket.cached_tokens)
        ending = with_role(frames.ending(finish, use, config.usage_position, ticket.include_usage))
        await send({"type": "http.response.body", "body": ending})
        result = "completed"

    try:
        if delay > 0 or config.chunk_interval > 0 or kind == "hold_after":
            await until_disconnect(receive, produce())
        else:
            await produce()
        if result == "dropped":
            await cut_connection(scope, receive)
    finally:
        emulator.finish(ticket, sent, result)


def _moonshot_routes(emulator: MoonshotEmulator) -> list[Route]:
    def unauthorized() -> Answer:
        return Answer(401, wire.error_body("invalid_authentication_error", wire.INVALID_AUTH))

    async def chat(scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        begun = emulator.begin(bearer_token(scope), raw)
        if isinstance(begun, Answer):
            await send_whole(send, begun.status, begun.headers, begun.body)
        elif begun.stream:
            await _stream(emulator, begun, scope, receive, send)
        else:
            await _complete(emulator, begun, scope, receive, send)

    async def models(scope: Scope, receive: Receive, send: Send) -> None:
        known = emulator.org_of(bearer_token(scope)) is not None
        answer = Answer(200, emulator.models_body()) if known else unauthorized()
        await send_whole(send, answer.status, answer.headers, answer.body)

    async def balance(scope: Scope, receive: Receive, send: Send) -> None:
        org = emulator.org_of(bearer_token(scope))
        if org is None:
            answer = unauthorized()
        else:
            cash = round(org.balance, 6)
            answer = Answer(200, orjson.dumps({
                "code": 0, "data": {"available_balance": cash, "voucher_balance": 0.0, "cash_balance": cash},
                "scode": "0x0", "status": True}))
        await send_whole(send, answer.status, answer.headers, answer.body)

    async def estimate(scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        answer = _estimate(emulator, bearer_token(scope), raw) or unauthorized()
        await send_whole(send, answer.status, answer.headers, answer.body)

    async def answers(request: Request) -> Response:
        """``POST /__fake/answers {"key": "sk-…" | "*", "answers": [...]}``: queue scripted answers."""
        try:
            raw = await request.body()
            body = orjson.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            key = body.get("key")
            if key is not None and not isinstance(key, str):
                raise ValueError('key must be an API key or "*" (any key)')
            queued = emulator.script_answers(None if key in (None, ANY_KEY) else key, body.get("answers"))
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            return Response(wire.error_body("invalid_request_error", str(exc)), status_code=400,
                            media_type="application/json")
        return Response(orjson.dumps({"queued": queued}), media_type="application/json")

    return [
        Route("/v1/chat/completions", Endpoint(chat), methods=["POST"]),
        Route("/v1/models", Endpoint(models), methods=["GET"]),
        Route("/v1/users/me/balance", Endpoint(balance), methods=["GET"]),
        Route("/v1/tokenizers/estimate-token-count", Endpoint(estimate), methods=["POST"]),
        Route("/__fake/answers", answers, methods=["POST"]),
    ]


def _estimate(emulator: MoonshotEmulator, api_key: str | None, raw: bytes) -> Answer | None:
    """The tokenizer route's answer; None when the key is not valid."""
    if emulator.org_of(api_key) is None:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) \
            or not isinstance(body.get("model"), str):
        message = wire.invalid_request("model and messages are required")
        return Answer(400, wire.error_body("invalid_request_error", message))
    if body["model"] not in emulator.config.models:
        return Answer(404, wire.error_body("resource_not_found_error", wire.model_not_found(body["model"])))
    tools = body.get("tools")
    total = scan(body["messages"], orjson.dumps(tools) if isinstance(tools, list) and tools else None).tokens
    body = {"code": 0, "data": {"total_tokens": total}, "scode": "0x0", "status": True}
    return Answer(200, orjson.dumps(body))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and methods answer in the API's error format, as the real gateway does."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    type_ = "resource_not_found_error" if status == 404 else "invalid_request_error"
    return Response(wire.error_body(type_, f"{request.method} {request.url.path}: {status}"),
                    status_code=status, media_type="application/json")


def create_moonshot_emulator(config: MoonshotEmulatorConfig, *, clock: Clock | None = None) -> EmulatorApp:
    """The emulator as an ASGI app; its state is ``app.state.emulator``."""
    emulator = MoonshotEmulator(config, clock if clock is not None else SystemClock())
    app = EmulatorApp(
        routes=[*_moonshot_routes(emulator), *control_routes(emulator)],
        exception_handlers={404: _http_error, 405: _http_error},
    )
    app.state.emulator = emulator
    return app
