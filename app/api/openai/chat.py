"""``POST /v1/chat/completions``: authenticate, parse, dispatch, render (SSE or one JSON body).

This is the hot path, so it is a bare ASGI app that ``FrontDoor`` calls directly: it does for
itself what the middleware stack does for the other routes (request id, CORS headers, errors as
OpenAI objects), which measured ~35% of a request's CPU when it went through Starlette's layers.

A request with an ``Idempotency-Key`` claims the key before it is dispatched (``app.idempotency``)
and keeps its answer when it succeeds; a retry gets that answer back, marked
``Idempotent-Replayed: true``. Without the header, all this costs one header lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import orjson
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from app.api.auth import Authenticator
from app.api.body import read_body
from app.api.errors import header, internal_error
from app.api.exchange import CommonHeaders, disconnect_of, error_headers, max_wait, send_json
from app.api.ids import Ids
from app.api.openai.schema import parse_chat_request, parse_json
from app.api.openai.sse import DONE, ChunkRenderer, completion_body
from app.api.stream import SSEResponse
from app.clock import Clock
from app.config import Settings
from app.dispatch import Dispatcher
from app.errors import KimiPoolError
from app.idempotency import Claim, Idempotency, Transcript, replay_events, request_hash, scoped_key
from app.pool.context import RequestContext
from app.pool.sessions import session_key
from app.shutdown import Shutdown
from app.store.records import IdempotentAnswer
from app.upstreams.base import Batch, ChatRequest, Usage

log = logging.getLogger("kimi_pool.api")


class ChatCompletions:
    def __init__(self, settings: Settings, clock: Clock, auth: Authenticator, dispatcher: Dispatcher, ids: Ids,
                 idempotency: Idempotency | None, shutdown: Shutdown | None = None) -> None:
        """``idempotency`` None: requests with an ``Idempotency-Key`` never reach this handler (a worker
        of ``serve --workers N`` passes them to the keeper). ``shutdown``: a request still running when
        the shutdown's grace period ends answers 503 ``shutting_down`` (the same object the dispatcher
        records it with)."""
        self._settings = settings
        self._shutdown = shutdown or Shutdown()
        self._clock = clock
        self._auth = auth
        self._dispatcher = dispatcher
        self._ids = ids
        self._idempotency = idempotency
        self._common_headers = CommonHeaders(settings.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = self._ids.request_id(header(scope, b"x-request-id"))
        headers = self._common_headers(scope, request_id)
        try:
            try:
                await self._handle(scope, receive, send, request_id, headers, started)
            except asyncio.CancelledError:
                cut = self._shutdown.cut()  # the dispatcher has recorded it as cut by the shutdown
                if cut is None:
                    raise
                raise cut from None
        except KimiPoolError as error:
            await send_json(send, error.status, orjson.dumps(error.body()), headers + error_headers(error))
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            await send_json(send, 500, orjson.dumps(internal_error(request_id).body()), headers)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                      headers: list[tuple[bytes, bytes]], started: float) -> None:
        dispatcher = self._dispatcher
        client = chat = None
        claim: Claim | None = None
        try:
            client = self._auth.authenticate(Headers(scope=scope))
            raw = await read_body(receive, header(scope, b"content-length"), self._settings.max_body_bytes)
            payload = parse_json(raw)
            chat = parse_chat_request(payload)
            dispatcher.check(chat)
            wait = max_wait(scope, self._settings.max_wait)
            key = header(scope, b"idempotency-key")
            if key is not None and self._idempotency is not None:  # may wait for a request holding the key
                claim = await self._idempotency.claim(scoped_key(key, client), request_hash(payload))
        except (KimiPoolError, asyncio.CancelledError) as caught:  # turned away at the door: still one request
            error = caught if isinstance(caught, KimiPoolError) else self._shutdown.cut()  # for metrics and the log
            if error is None:
                raise
            dispatcher.refused(request_id, client, chat.model if chat else None,
                               chat.stream if chat else False, error, started)
            raise error from None
        if claim is not None and claim.replay is not None:
            await _replay(scope, receive, send, chat, claim.replay, headers)
            dispatcher.replayed(request_id, client, chat.model, chat.stream, started)
            return
        try:
            ctx = RequestContext(request_id, client, max_wait=wait, session=_conversation(scope, chat, client),
                                 started=started, gone=disconnect_of(receive))
            completion_id = self._ids.completion_id()
            now = self._clock.time()
            created = int(now)
            headers += dispatcher.leases.headroom(chat.model, now)
            if not chat.stream:
                completion = await dispatcher.complete(chat, ctx)
                body = orjson.dumps(completion_body(completion, completion_id, created, chat.model))
                if claim is not None:
                    claim.keep(body)  # before sending: the quota is spent even if the client is gone
                headers.append((b"x-kimi-pool-account", (ctx.account or "").encode()))
                await send_json(send, 200, body, headers)
                return
            events = dispatcher.stream(chat, ctx)
            first = await anext(events)  # failover happens here; an error is still a JSON answer
            headers.append((b"x-kimi-pool-account", (ctx.account or "").encode()))
            renderer = ChunkRenderer(completion_id, created, chat.model)
            frames = _frames(renderer, first, events, chat.include_usage, claim)
            await SSEResponse(frames, headers, self._shutdown)(scope, receive, send)
        finally:
            if claim is not None:
                claim.release()  # a no-op after ``keep``; else the next request with the key runs


def _conversation(scope: Scope, chat: ChatRequest, client: str | None) -> str | None:
    """The session key of a request that belongs to a conversation: one the client names
    (``X-Session-Id``, ``prompt_cache_key`` or ``user``), or one with history. A lone first turn without either gets no
    binding, so a batch of single-turn requests does not fill the session table; its second turn
    (which carries the first answer) binds the conversation."""
    named = header(scope, b"x-session-id")
    hint = named.decode("latin-1") if named else chat.session_hint  # X-Session-Id, else prompt_cache_key
    user = chat.params.get("user")
    if not hint and not user and not any(m.get("role") == "assistant" for m in chat.messages):
        return None
    return session_key(session_header=hint, user=user, client=client, messages=chat.messages)


async def _replay(scope: Scope, receive: Receive, send: Send, chat: ChatRequest, answer: IdempotentAnswer,
                  headers: list[tuple[bytes, bytes]]) -> None:
    """Send a stored answer again, as JSON or, if this request streams, as the stream it amounts to."""
    headers.append((b"idempotent-replayed", b"true"))
    if not chat.stream:
        await send_json(send, answer.status, answer.body, headers)
        return
    body = orjson.loads(answer.body)
    renderer = ChunkRenderer(body["id"], body["created"], body["model"])
    frames = _frames(renderer, replay_events(body), _no_more(), chat.include_usage)
    await SSEResponse(frames, headers)(scope, receive, send)


async def _no_more() -> AsyncIterator[Batch]:
    nothing: tuple[Batch, ...] = ()
    for batch in nothing:
        yield batch


async def _frames(renderer: ChunkRenderer, first: Batch, events: AsyncIterator[Batch],
                  include_usage: bool, claim: Claim | None = None) -> AsyncIterator[bytes]:
    """One piece of SSE per batch of upstream events (the role chunk goes with the first). With a
    ``claim``, the whole answer is kept once the upstream has finished it."""
    usage: Usage | None = None
    batch = first
    frames = [renderer.role()]
    transcript = None if claim is None else Transcript()
    try:
        while True:
            if transcript is not None:
                transcript.add(batch)
            for event in batch:
                if type(event) is Usage:
                    usage = event
                else:
                    frame = renderer.event(event)
                    if frame is not None:
                        frames.append(frame)
            if frames:
                yield b"".join(frames)
                frames = []
            try:
                batch = await anext(events)
            except StopAsyncIteration:
                break
    except KimiPoolError as error:
        yield renderer.error(error)
        return
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if claim is not None and transcript is not None:
        claim.keep(orjson.dumps(completion_body(transcript.completion(), renderer.id, renderer.created,
                                                 renderer.model)))
    if include_usage and usage is not None:
        yield renderer.usage(usage)
    yield DONE
