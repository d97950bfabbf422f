"""A faithful fake of the kimi.com web API, spoken over Connect RPC (PROTOCOLS.md section 3).

``create_kimi_web_emulator(config)`` returns a Starlette app serving

* ``POST /apiv2/kimi.gateway.chat.v1.ChatService/Chat``: one enveloped JSON request in, a stream of
  enveloped "op + mask" frames out, ending with ``done`` and an end-of-stream frame; kimi-auth JWTs
  that expire on the clock or are revoked; per-user turn quotas; one live stream per user;
* the unary RPCs ``DeleteChat``, ``BatchDeleteChats``, ``ListChats``, ``ListMessages`` and
  ``GetSubscription`` (plain JSON);
* the control routes ``/__fake/script|release|state|reset|config``, plus ``POST /__fake/revoke``
  (``{"token": …}`` or ``{"user": …}``) and ``POST /__fake/token`` (``{"user": …}`` → a fresh token).

``app.state.emulator`` is the ``KimiWebEmulator`` behind it. Time (token expiry, quota windows,
latency) comes from the injected clock, so a ``ManualClock`` makes all of it deterministic.
"""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.clock import Clock, SystemClock
from app.emulator import kimi_web_wire as wire
from app.emulator.asgi import (
    EmulatorApp,
    Endpoint,
    bearer_token,
    cut_connection,
    read_body,
    send_whole,
    until_disconnect,
)
from app.emulator.control import control_routes
from app.emulator.kimi_web_config import EMULATOR_JWT_SECRET, OUTCOME_KINDS, KimiWebEmulatorConfig, mint_jwt
from app.emulator.kimi_web_records import Answer, Chat, KimiWebStats, Message, StreamCounters, Ticket
from app.emulator.kimi_web_state import KimiWebEmulator

__all__ = [
    "EMULATOR_JWT_SECRET",
    "OUTCOME_KINDS",
    "Chat",
    "KimiWebEmulator",
    "KimiWebEmulatorConfig",
    "KimiWebStats",
    "Message",
    "StreamCounters",
    "create_kimi_web_emulator",
    "mint_jwt",
]

CHAT_PATH = "/apiv2/kimi.gateway.chat.v1.ChatService/Chat"
UNARY_PATHS = {
    "/apiv2/kimi.chat.v1.ChatService/DeleteChat": "DeleteChat",
    "/apiv2/kimi.chat.v1.ChatService/BatchDeleteChats": "BatchDeleteChats",
    "/apiv2/kimi.chat.v1.ChatService/ListChats": "ListChats",
    "/apiv2/kimi.gateway.chat.v1.ChatService/ListMessages": "ListMessages",
    "/apiv2/kimi.gateway.order.v1.SubscriptionService/GetSubscription": "GetSubscription",
}
_CUT_KINDS = ("drop_after", "error_frame_after", "hold_after")


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _media_type(scope: Scope) -> str:
    return _header(scope, b"content-type").partition(";")[0].strip().lower()


def credential(scope: Scope) -> str | None:
    """The Bearer token, else the ``kimi-auth`` cookie."""
    token = bearer_token(scope)
    if token is not None:
        return token
    for part in _header(scope, b"cookie").split(";"):
        name, _, value = part.strip().partition("=")
        if name == "kimi-auth" and value:
            return value
    return None


class _Writer:
    """Collects frames and writes them at once, or each in two pieces split inside its header."""

    __slots__ = ("_pending", "_send", "_split")

    def __init__(self, send: Send, split: bool) -> None:
        self._send = send
        self._split = split
        self._pending: list[bytes] = []

    def add(self, *frames: bytes) -> None:
        self._pending.extend(frames)

    async def flush(self, final: bool = False) -> None:
        frames, self._pending = self._pending, []
        if self._split:
            parts = [piece for frame in frames for piece in (frame[:2], frame[2:])]
        else:
            parts = [b"".join(frames)] if frames else []
        if final and not parts:
            parts = [b""]
        for number, part in enumerate(parts, start=1):
            more = not (final and number == len(parts))
            await self._send({"type": "http.response.body", "body": part, "more_body": more})


async def _send_answer(send: Send, answer: Answer, split: bool) -> None:
    if not (answer.stream and split):
        await send_whole(send, answer.status, answer.headers, answer.body)
        return
    headers = [*answer.headers, (b"content-length", b"%d" % len(answer.body))]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    writer = _Writer(send, split)
    writer.add(answer.body)
    await writer.flush(final=True)


async def _stream(emulator: KimiWebEmulator, ticket: Ticket, scope: Scope, receive: Receive, send: Send) -> None:
    """The frames of one turn (PROTOCOLS.md 3.4), shaped by the ticket's scripted outcome."""
    config = emulator.config
    clock = emulator.clock
    outcome = ticket.outcome
    kind = outcome.kind if outcome is not None else "ok"
    delay = outcome["seconds"] if outcome is not None and kind == "delay_first_token" else config.first_token_delay
    interval = config.chunk_interval
    every = config.heartbeat_every
    chat, question, reply = ticket.chat, ticket.question, ticket.reply
    created = wire.iso(question.created)
    opening = (
        wire.chat_frame(chat.id, chat.name, wire.iso(chat.created)),
        wire.message_frame(question.id, question.parent_id, "user", wire.STATUS_COMPLETED, question.scenario, created),
        wire.message_frame(reply.id, question.id, "assistant", wire.STATUS_GENERATING, reply.scenario, created),
    )
    thinking = wire.block_frames("think", "0", reply.id, ticket.think)
    pieces = thinking + wire.block_frames("text", "1", reply.id, ticket.text)
    first_text = len(thinking)
    stop = first_text + min(outcome["chunks"], len(ticket.text)) if outcome is not None and kind in _CUT_KINDS \
        else len(pieces)
    writer = _Writer(send, config.split_writes)
    sent = 0
    status_sent = False
    result = "disconnect"

    async def emit(end: int) -> None:
        nonlocal sent
        while sent < end:
            if sent > 0 and interval > 0:
                await writer.flush()
                await clock.sleep(interval)
            writer.add(pieces[sent])
            sent += 1
            appends = sent - first_text - 1
            if every and appends > 0 and appends % every == 0:
                writer.add(wire.HEARTBEAT)

    async def produce() -> None:
        nonlocal result, status_sent
        await send({"type": "http.response.start", "status": 200, "headers": list(wire.STREAM_HEADERS)})
        writer.add(*opening)
        if delay > 0:
            await writer.flush()
            await clock.sleep(delay)
        await emit(stop)
        if kind == "drop_after":
            await writer.flush()
            result = "dropped"
            return
        if kind == "error_frame_after":
            assert outcome is not None
            writer.add(wire.end_frame(outcome["code"], outcome["message"]))
            await writer.flush(final=True)
            result = "error"
            return
        if kind == "hold_after":
            await writer.flush()
            await emulator.gate.hold()
        await emit(len(pieces))
        status = wire.STATUS_FAILED if ticket.limited else wire.STATUS_COMPLETED
        writer.add(wire.status_frame(reply.id, status))
        status_sent = True
        if ticket.new_chat and not ticket.limited:
            writer.add(wire.chat_name_frame(chat.id, ticket.name))
        if kind != "no_done":
            writer.add(wire.DONE)
        if kind == "drop_before_end":
            await writer.flush()
            result = "dropped"
            return
        writer.add(wire.END_OK)
        await writer.flush(final=True)
        result = "no_done" if kind == "no_done" else "completed"

    try:
        if delay > 0 or interval > 0 or kind == "hold_after":
            await until_disconnect(receive, produce())
        else:
            await produce()
        if result == "dropped":
            await cut_connection(scope, receive)
    finally:
        emulator.finish(ticket, min(sent, first_text), max(0, sent - first_text), result, status_sent)


def _api_routes(emulator: KimiWebEmulator) -> list[Route]:
    async def chat(scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        begun = emulator.begin(credential(scope), _media_type(scope), raw)
        if isinstance(begun, Answer):
            await _send_answer(send, begun, emulator.config.split_writes)
        else:
            await _stream(emulator, begun, scope, receive, send)

    def unary(method: str) -> Endpoint:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            raw = await read_body(receive)
            answer = emulator.unary(method, credential(scope), _media_type(scope), raw)
            await send_whole(send, answer.status, answer.headers, answer.body)

        return Endpoint(handle)

    return [
        Route(CHAT_PATH, Endpoint(chat), methods=["POST"]),
        *(Route(path, unary(method), methods=["POST"]) for path, method in UNARY_PATHS.items()),
    ]


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _refuse(message: str) -> Response:
    return _json({"error": {"type": "invalid_request_error", "message": message}}, 400)


def _token_routes(emulator: KimiWebEmulator) -> list[Route]:
    """``POST /__fake/revoke`` and ``POST /__fake/token``, beside the shared control routes."""

    async def body_of(request: Request) -> dict[str, object]:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    async def revoke(request: Request) -> Response:
        try:
            body = await body_of(request)
            target = body.get("token", body.get("user"))
            if len(body) != 1 or not isinstance(target, str) or not target:
                raise ValueError('send {"token": "<jwt>"} or {"user": "<user id>"}')
            if "user" in body and target not in emulator.config.users:
                raise ValueError(f"unknown user {target!r}")
        except ValueError as exc:
            return _refuse(str(exc))
        emulator.revoke(target)
        return _json({"revoked": target})

    async def token(request: Request) -> Response:
        try:
            user = (await body_of(request)).get("user")
            if not isinstance(user, str):
                raise ValueError('send {"user": "<user id>"}')
            return _json({"token": emulator.token(user)})
        except ValueError as exc:
            return _refuse(str(exc))

    return [
        Route("/__fake/revoke", revoke, methods=["POST"]),
        Route("/__fake/token", token, methods=["POST"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown procedures and methods answer with a Connect error body."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = "unimplemented" if status in (404, 405) else "unknown"
    return Response(wire.error_body(code, f"{request.method} {request.url.path}: {status}"),
                    status_code=status, media_type="application/json")


def create_kimi_web_emulator(config: KimiWebEmulatorConfig | None = None, *,
                             clock: Clock | None = None) -> EmulatorApp:
    """The emulator as an ASGI app (two users by default); its state is ``app.state.emulator``."""
    emulator = KimiWebEmulator(config if config is not None else KimiWebEmulatorConfig.simple(),
                               clock if clock is not None else SystemClock())
    app = EmulatorApp(
        routes=[*_api_routes(emulator), *control_routes(emulator), *_token_routes(emulator)],
        exception_handlers={404: _http_error, 405: _http_error},
    )
    app.state.emulator = emulator
    return app
