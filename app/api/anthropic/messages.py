"""``POST /v1/messages`` (also ``?beta=true``): authenticate, parse, dispatch, render as Anthropic's message or
event stream. A bare ASGI handler on the hot path, like ``app.api.openai.chat``.

Keys come as ``x-api-key`` or ``Authorization: Bearer`` (the same client keys); ``anthropic-version`` and
``anthropic-beta`` are accepted and ignored (an unknown beta is never an error). A stream's failover happens
before its first byte; after it, a failure ends the stream with ``event: error`` and Anthropic's error body,
never a bare end (which Claude Code would take as a finished, empty answer).

The conversation key, for the account binding (the upstream's prompt cache): ``X-Session-Id``, else Claude
Code's ``x-claude-code-session-id``, else the session in ``metadata.user_id``, else the user it names, else
(from the second turn on) the digest of the conversation's start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import orjson
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from app.api.anthropic.content import THINKING
from app.api.anthropic.errors import error_frame, error_headers, error_json
from app.api.anthropic.models import unknown_model
from app.api.anthropic.render import EventStream, message_body
from app.api.anthropic.schema import MessagesRequest, parse_messages_request
from app.api.auth import Authenticator
from app.api.body import read_body
from app.api.errors import header
from app.api.exchange import CommonHeaders, disconnect_of, max_wait, send_json
from app.api.ids import Ids
from app.api.openai.schema import parse_json
from app.api.stream import SSEResponse
from app.clock import Clock
from app.config import Settings
from app.dispatch import Dispatcher
from app.errors import KimiPoolError, ModelNotFound
from app.pool.context import RequestContext
from app.pool.sessions import session_key
from app.sealing import Sealer
from app.shutdown import Shutdown
from app.tokens import estimate_tokens
from app.upstreams.base import Batch

log = logging.getLogger("kimi_pool.api")
EXPOSED = ("x-request-id", "request-id", "retry-after", "x-kimi-pool-account")


class Messages:
    def __init__(self, settings: Settings, clock: Clock, auth: Authenticator, dispatcher: Dispatcher, ids: Ids,
                 sealer: Sealer, shutdown: Shutdown | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self._auth = auth
        self._dispatcher = dispatcher
        self._ids = ids
        self._sealer = sealer
        self._shutdown = shutdown or Shutdown()
        self._common_headers = CommonHeaders(settings.cors_origins, EXPOSED)

    def verify(self, thinking: str, signature: str) -> bool:
        return self._sealer.verify(THINKING, thinking.encode(), signature)

    def sign(self, thinking: str) -> str:
        return self._sealer.sign(THINKING, thinking.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = self._ids.request_id(header(scope, b"x-request-id"))
        headers = self._common_headers(scope, request_id)
        headers.append((b"request-id", request_id.encode()))
        try:
            try:
                await self._handle(scope, receive, send, request_id, headers, started)
            except asyncio.CancelledError:
                cut = self._shutdown.cut()
                if cut is None:
                    raise
                raise cut from None
        except KimiPoolError as error:
            status, body = error_json(error, request_id)
            await send_json(send, status, body, headers + error_headers(error))
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            status, body = error_json(KimiPoolError(f"Internal error; quote request id {request_id} when reporting "
                                                    "it."), request_id)
            await send_json(send, status, body, headers)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                      headers: list[tuple[bytes, bytes]], started: float) -> None:
        dispatcher = self._dispatcher
        client = parsed = None
        try:
            client = self._auth.authenticate(Headers(scope=scope))
            raw = await read_body(receive, header(scope, b"content-length"), self._settings.max_body_bytes)
            parsed = parse_messages_request(parse_json(raw), self.verify)
            try:
                dispatcher.check(parsed.chat)
            except ModelNotFound:
                raise unknown_model(parsed.chat.model, dispatcher.leases.models()) from None
            wait = max_wait(scope, self._settings.max_wait)
        except (KimiPoolError, asyncio.CancelledError) as caught:  # turned away at the door: still one request
            error = caught if isinstance(caught, KimiPoolError) else self._shutdown.cut()
            if error is None:
                raise
            chat = parsed.chat if parsed else None
            dispatcher.refused(request_id, client, chat.model if chat else None, chat.stream if chat else False,
                               error, started)
            raise error from None
        chat = parsed.chat
        ctx = RequestContext(request_id, client, max_wait=wait, session=_conversation(scope, parsed, client),
                             started=started, gone=disconnect_of(receive))
        message_id = self._ids.new("msg_")
        headers += dispatcher.leases.headroom(chat.model, self._clock.time())
        if not chat.stream:
            completion = await dispatcher.complete(chat, ctx)
            body = orjson.dumps(message_body(completion, message_id, chat.model, self.sign))
            headers.append((b"x-kimi-pool-account", (ctx.account or "").encode()))
            await send_json(send, 200, body, headers)
            return
        events = dispatcher.stream(chat, ctx)
        first = await anext(events)  # failover happens here; an error is still a whole error answer
        headers.append((b"x-kimi-pool-account", (ctx.account or "").encode()))
        renderer = EventStream(message_id, chat.model, self.sign, estimate_tokens(chat.messages))
        await SSEResponse(_frames(renderer, first, events, request_id), headers, self._shutdown,
                          error_frame=lambda error: error_frame(error, request_id))(scope, receive, send)


def _conversation(scope: Scope, parsed: MessagesRequest, client: str | None) -> str | None:
    chat = parsed.chat
    named = header(scope, b"x-session-id") or header(scope, b"x-claude-code-session-id")
    hint = named.decode("latin-1") if named else chat.session_hint
    if not hint and not parsed.user and not any(m.get("role") == "assistant" for m in chat.messages):
        return None  # a lone first turn: no binding (its second turn binds the conversation)
    return session_key(session_header=hint, user=parsed.user, client=client, messages=chat.messages)


async def _frames(renderer: EventStream, first: Batch, events: AsyncIterator[Batch],
                  request_id: str) -> AsyncIterator[bytes]:
    """The event stream: ``message_start`` with the first batch's events, one piece per batch after, the end
    once the upstream has finished; any failure after the first byte ends it with ``event: error``."""
    batch = first
    head = renderer.start()
    try:
        while True:
            frame = renderer.events(batch)
            if head:
                frame = head + frame
                head = b""
            if frame:
                yield frame
            try:
                batch = await anext(events)
            except StopAsyncIteration:
                break
    except KimiPoolError as error:
        yield error_frame(error, request_id)
        return
    except Exception:
        log.exception("the stream of request %s failed", request_id)
        yield error_frame(KimiPoolError(f"Internal error; quote request id {request_id} when reporting it."),
                          request_id)
        return
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    yield renderer.end()
