"""The kimi.com web (Connect RPC) emulator under real uvicorn, driven over HTTP with enveloped JSON.

Time only moves when a test advances the ``ManualClock``; nothing here sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import orjson
import pytest

from app.clock import ManualClock
from app.emulator.kimi_web import (
    EMULATOR_JWT_SECRET,
    KimiWebEmulator,
    KimiWebEmulatorConfig,
    create_kimi_web_emulator,
    mint_jwt,
)
from tests.conftest import serve

USER = "user-000000000000001"
OTHER = "user-000000000000002"
CHAT = "/apiv2/kimi.gateway.chat.v1.ChatService/Chat"
DELETE = "/apiv2/kimi.chat.v1.ChatService/DeleteChat"
BATCH_DELETE = "/apiv2/kimi.chat.v1.ChatService/BatchDeleteChats"
LIST_CHATS = "/apiv2/kimi.chat.v1.ChatService/ListChats"
LIST_MESSAGES = "/apiv2/kimi.gateway.chat.v1.ChatService/ListMessages"
SUBSCRIPTION = "/apiv2/kimi.gateway.order.v1.SubscriptionService/GetSubscription"
CONNECT = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}
WORDS = " Hello from the Kimi web emulator, a deterministic reply for the gateway."
REPLY = "Turn 1 of chat:" + WORDS
THOUGHT = "Let me think about this request"
USAGE_LIMIT_TEXT = "Usage limit reached. You have used up the conversations of this period; please try again later."
ID = re.compile(r"[0-9a-v]{20}")
ISO = "2025-10-09T08:53:20Z"  # the ManualClock's start, 1_760_000_000


# --- the client side: envelopes ------------------------------------------------------------------------


def envelope(message: object, flags: int = 0) -> bytes:
    payload = message if isinstance(message, bytes) else orjson.dumps(message)
    return struct.pack(">BI", flags, len(payload)) + payload


class Decoded:
    """The data frames of a response body, its end-of-stream frame (None if absent), leftover bytes."""

    def __init__(self, body: bytes) -> None:
        self.frames: list[dict[str, Any]] = []
        self.end: dict[str, Any] | None = None
        at = 0
        while len(body) - at >= 5:
            flags, length = struct.unpack_from(">BI", body, at)
            if len(body) - at - 5 < length:
                break
            message = orjson.loads(body[at + 5:at + 5 + length])
            at += 5 + length
            assert self.end is None, "nothing may follow the end-of-stream frame"
            if flags == 0x02:
                self.end = message
            else:
                assert flags == 0x00
                self.frames.append(message)
        self.rest = body[at:]

    @property
    def kinds(self) -> list[str]:
        """Each frame's mask, or its only key (``heartbeat``, ``done``)."""
        return [frame.get("mask") or next(iter(frame)) for frame in self.frames]

    def content(self, kind: str = "text") -> str:
        return "".join(frame["block"][kind]["content"] for frame in self.frames
                       if frame.get("mask", "").startswith(f"block.{kind}"))

    def chat_id(self) -> str:
        return str(self.frames[0]["chat"]["id"])

    def reply_id(self) -> str:
        return str(self.frames[2]["message"]["id"])


def request(prompt: str = "Hello, Kimi!", *, scenario: str = "SCENARIO_K2D5", thinking: bool = False,
            chat_id: str | None = None, parent_id: str | None = None) -> dict[str, Any]:
    """A Chat request as the web client sends it (PROTOCOLS.md 3.3)."""
    message: dict[str, Any] = {"role": "user", "blocks": [{"message_id": "", "text": {"content": prompt}}],
                               "scenario": scenario}
    body: dict[str, Any] = {"scenario": scenario, "tools": [], "message": message,
                            "options": {"thinking": thinking}, "project_id": ""}
    if chat_id is not None:
        body["chat_id"] = chat_id
    if parent_id is not None:
        message["parent_id"] = parent_id
    return body


class Running:
    def __init__(self, url: str, emulator: KimiWebEmulator, clock: ManualClock, http: httpx.AsyncClient) -> None:
        self.url = url
        self.emulator = emulator
        self.clock = clock
        self.http = http

    def token(self, user: str = USER) -> str:
        return self.emulator.token(user)

    async def chat(self, token: str | None, body: dict[str, Any] | bytes | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
        content = body if isinstance(body, bytes) else envelope(body or request())
        return await self.http.post(CHAT, content=content, headers={**CONNECT, **auth, **(headers or {})})

    async def turn(self, token: str, body: dict[str, Any] | None = None) -> Decoded:
        response = await self.chat(token, body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/connect+json"
        return Decoded(response.content)

    def stream(self, token: str, body: dict[str, Any] | None = None
               ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        return self.http.stream("POST", CHAT, content=envelope(body or request()),
                                headers={**CONNECT, "Authorization": f"Bearer {token}"})

    async def unary(self, path: str, token: str | None, body: object = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return await self.http.post(path, json={} if body is None else body, headers=headers)


@contextlib.asynccontextmanager
async def running(config: KimiWebEmulatorConfig | None = None) -> AsyncIterator[Running]:
    clock = ManualClock()
    app = create_kimi_web_emulator(config, clock=clock)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield Running(url, app.state.emulator, clock, http)


async def received(response: httpx.Response) -> tuple[bytes, bool]:
    """Everything the body delivered, and whether it was cut (EOF inside the chunked body)."""
    data = b""
    try:
        async for chunk in response.aiter_raw():
            data += chunk
    except httpx.RemoteProtocolError:
        return data, True
    return data, False


def error_of(decoded: Decoded) -> tuple[str, str]:
    assert decoded.frames == [] and decoded.end is not None and set(decoded.end) == {"error"}, decoded.frames
    return decoded.end["error"]["code"], decoded.end["error"]["message"]


# --- the stream ----------------------------------------------------------------------------------------


async def test_a_new_chat_streams_every_frame_in_order_and_ends_cleanly() -> None:
    async with running() as run:
        got = await run.turn(run.token())
        assert got.end == {} and got.rest == b""
        assert got.kinds == ["chat", "message", "message", "block.text", *["block.text.content"] * 4, "heartbeat",
                             *["block.text.content"] * 4, "heartbeat", *["block.text.content"] * 4, "heartbeat",
                             "message.status", "chat.name", "done"]
        chat_id, reply_id = got.chat_id(), got.reply_id()
        question_id = got.frames[1]["message"]["id"]
        assert ID.fullmatch(chat_id) and ID.fullmatch(question_id) and ID.fullmatch(reply_id)
        assert len({chat_id, question_id, reply_id}) == 3
        assert got.frames[:4] == [
            {"op": "set", "mask": "chat", "chat": {"id": chat_id, "name": "", "createTime": ISO}},
            {"op": "set", "mask": "message", "message": {
                "id": question_id, "parentId": "", "role": "user", "status": "MESSAGE_STATUS_COMPLETED",
                "scenario": "SCENARIO_K2D5", "createTime": ISO}},
            {"op": "set", "mask": "message", "message": {
                "id": reply_id, "parentId": question_id, "role": "assistant", "status": "MESSAGE_STATUS_GENERATING",
                "scenario": "SCENARIO_K2D5", "createTime": ISO}},
            {"op": "set", "mask": "block.text", "block": {"id": "1", "parentId": reply_id,
                                                          "text": {"content": "Turn 1 of chat:"}}},
        ]
        assert got.frames[4] == {"op": "append", "mask": "block.text.content",
                                 "block": {"id": "1", "text": {"content": " Hello"}}}
        assert got.frames[-3:] == [
            {"op": "set", "mask": "message.status", "message": {"id": reply_id, "status": "MESSAGE_STATUS_COMPLETED"}},
            {"op": "set", "mask": "chat.name", "chat": {"id": chat_id, "name": "Hello, Kimi!"}},
            {"done": {}},
        ]
        assert got.frames[8] == {"heartbeat": {}}
        assert got.content() == REPLY

        chat = run.emulator.chats[chat_id]
        assert (chat.owner, chat.name) == (USER, "Hello, Kimi!")
        assert [(m.id, m.parent_id, m.role, m.content, m.scenario, m.status) for m in chat.messages] == [
            (question_id, "", "user", "Hello, Kimi!", "SCENARIO_K2D5", "MESSAGE_STATUS_COMPLETED"),
            (reply_id, question_id, "assistant", REPLY, "SCENARIO_K2D5", "MESSAGE_STATUS_COMPLETED")]
        stats = run.emulator.stats
        assert (stats.chat_requests, stats.by_code, stats.completed_streams) == (1, {"ok": 1}, 1)
        assert stats.chats_created == 1
        assert (stats.in_flight, stats.peak_in_flight, stats.users[USER].peak_in_flight) == (0, 1, 1)
        assert stats.users[OTHER].chat_requests == 0


async def test_thinking_streams_think_blocks_before_the_answer() -> None:
    async with running() as run:
        got = await run.turn(run.token(), request(thinking=True, scenario="SCENARIO_K2D6"))
        assert got.kinds[3:10] == ["block.think", *["block.think.content"] * 5, "block.text"]
        reply_id = got.reply_id()
        assert got.frames[3] == {"op": "set", "mask": "block.think",
                                 "block": {"id": "0", "parentId": reply_id, "think": {"content": "Let"}}}
        assert got.frames[4] == {"op": "append", "mask": "block.think.content",
                                 "block": {"id": "0", "think": {"content": " me"}}}
        assert got.content("think") == THOUGHT and got.content() == REPLY
        assert run.emulator.chats[got.chat_id()].messages[1].think == THOUGHT
        assert "block.think" not in (await run.turn(run.token())).kinds, "thinking is asked for, not default"


async def test_a_chat_continues_with_its_chat_id_and_parent_id() -> None:
    async with running() as run:
        token = run.token()
        first = await run.turn(token, request(chat_id="", parent_id=""))  # empty strings mean a new chat too
        chat_id, reply_id = first.chat_id(), first.reply_id()
        second = await run.turn(token, request("And then?", chat_id=chat_id, parent_id=reply_id))
        assert second.chat_id() == chat_id
        assert second.frames[0]["chat"] == {"id": chat_id, "name": "Hello, Kimi!", "createTime": ISO}
        assert second.frames[1]["message"]["parentId"] == reply_id
        assert second.content() == "Turn 2 of chat:" + WORDS
        assert "chat.name" not in second.kinds, "only the first turn names the chat"
        third = await run.turn(token, request("Once more", chat_id=chat_id))  # no parent: after the last message
        assert third.frames[1]["message"]["parentId"] == second.reply_id()
        assert third.content().startswith("Turn 3 of chat:")
        chat = run.emulator.chats[chat_id]
        assert [m.role for m in chat.messages] == ["user", "assistant"] * 3
        assert run.emulator.stats.chats_created == 1 and len(run.emulator.chats) == 1
        fresh = await run.turn(token)
        assert fresh.chat_id() != chat_id and fresh.content() == REPLY


async def test_a_chat_of_nobody_or_of_another_user_is_not_found() -> None:
    async with running() as run:
        token = run.token()
        mine = await run.turn(token)
        code, message = error_of(await run.turn(token, request(chat_id="d3jng0000000000nope")))
        assert code == "not_found" and "d3jng0000000000nope" in message
        assert error_of(await run.turn(run.token(OTHER), request(chat_id=mine.chat_id())))[0] == "not_found"
        code, message = error_of(await run.turn(token, request(chat_id=mine.chat_id(), parent_id="x" * 20)))
        assert code == "invalid_argument" and "parent" in message
        assert error_of(await run.turn(token, request(parent_id=mine.reply_id())))[0] == "invalid_argument"
        assert run.emulator.stats.by_code == {"ok": 1, "not_found": 2, "invalid_argument": 2}


MALFORMED = [
    (orjson.dumps(request()), "not an enveloped message"),  # bare JSON, as some clients try first
    (envelope(b"{not json"), "not valid JSON"),
    (envelope(request())[:-3], "declares"),
    (envelope(request(), flags=0x01), "compressed"),
    (b"", "not an enveloped message"),
    (envelope([1, 2]), "JSON object"),
    (envelope(request(scenario="SCENARIO_GPT")), "unknown scenario"),
    (envelope(request("   ")), "non-empty"),
    (envelope({**request(), "options": {"thinking": "yes"}}), "thinking"),
    (envelope({**request(), "chat_id": 7}), "chat_id"),
]


async def test_a_malformed_request_is_an_invalid_argument_end_of_stream() -> None:
    async with running() as run:
        token = run.token()
        for body, problem in MALFORMED:
            response = await run.chat(token, body)
            assert response.status_code == 200
            code, message = error_of(Decoded(response.content))
            assert code == "invalid_argument" and problem in message, (body, message)
        assert run.emulator.stats.by_code == {"invalid_argument": len(MALFORMED)} and run.emulator.chats == {}


async def test_a_wrong_content_type_is_refused_with_415() -> None:
    async with running() as run:
        response = await run.chat(run.token(), headers={"Content-Type": "application/json"})
        assert response.status_code == 415
        assert response.json() == {"code": "invalid_argument",
                                   "message": "content-type must be application/connect+json"}
        ok = await run.chat(run.token(), headers={"Content-Type": "application/connect+json; charset=utf-8"})
        assert Decoded(ok.content).end == {}


# --- tokens --------------------------------------------------------------------------------------------


def test_minted_tokens_carry_the_kimi_auth_claims() -> None:
    token = mint_jwt(USER, now=1_760_000_000.5)
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    claims = jwt.decode(token, EMULATOR_JWT_SECRET, algorithms=["HS512"], options={"verify_exp": False})
    assert {k: claims[k] for k in ("iss", "typ", "app_id", "sub", "region", "membership", "iat", "exp")} == {
        "iss": "user-center", "typ": "access", "app_id": "kimi", "sub": USER, "region": "cn",
        "membership": {"level": 10}, "iat": 1_760_000_000, "exp": 1_760_000_000 + 2_592_000}
    assert len(claims["sub"]) == 20 and len(claims["space_id"]) == 20 and len(claims["abstract_user_id"]) == 20
    assert claims["device_id"].isdigit() and claims["ssid"].isdigit()
    again = jwt.decode(mint_jwt(USER, now=0, ttl=60, region="global", space_id="s"), EMULATOR_JWT_SECRET,
                       algorithms=["HS512"], options={"verify_exp": False})
    assert (again["exp"], again["region"], again["space_id"], again["device_id"]) == (
        60, "global", "s", claims["device_id"])


@pytest.mark.parametrize("mode", ["stream", "http"])
async def test_bad_expired_and_revoked_tokens_are_unauthenticated(mode: str) -> None:
    async with running(KimiWebEmulatorConfig.simple(auth_error_mode=mode, token_ttl=3600)) as run:

        async def refusal(token: str | None) -> str:
            response = await run.chat(token)
            if mode == "http":
                assert response.status_code == 401
                body = response.json()
                assert set(body) == {"code", "message"} and body["code"] == "unauthenticated"
                return str(body["message"])
            assert response.status_code == 200
            code, message = error_of(Decoded(response.content))
            assert code == "unauthenticated"
            return message

        assert "no access token" in await refusal(None)
        assert "invalid" in await refusal(mint_jwt(USER, now=run.clock.time(), secret="x" * 64))
        assert "invalid" in await refusal(mint_jwt("user-nobody", now=run.clock.time()))
        assert "invalid" in await refusal("not-a-jwt")
        external = mint_jwt(USER, now=run.clock.time(), ttl=3600)  # signed with the emulator's key: accepted
        assert (await run.turn(external)).end == {}
        run.clock.advance(3599)
        assert (await run.turn(external)).end == {}
        run.clock.advance(1)
        assert "expired" in await refusal(external)

        token, other = run.token(), run.token()
        run.emulator.revoke(token)
        assert "revoked" in await refusal(token)
        assert (await run.turn(other)).end == {}, "revoking one token leaves the user's others"
        run.emulator.revoke(USER)
        assert "revoked" in await refusal(other)
        assert "revoked" in await refusal(mint_jwt(USER, now=run.clock.time() - 10))
        assert (await run.turn(run.token())).end == {}, "a new login after the revocation works"
        assert (await run.turn(run.token(OTHER))).end == {}, "other users are untouched"
        stats = run.emulator.stats
        assert stats.by_code == {"unauthenticated": 8, "ok": 5}
        assert stats.users[USER].by_code == {"unauthenticated": 4, "ok": 4}


async def test_the_kimi_auth_cookie_is_accepted_instead_of_a_bearer_header() -> None:
    async with running() as run:
        response = await run.chat(None, headers={"Cookie": f"theme=dark; kimi-auth={run.token()}"})
        assert Decoded(response.content).end == {}


# --- quota and concurrency -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stream", "http", "status"])
async def test_the_turn_quota_refuses_in_its_mode_and_recovers_after_the_window(mode: str) -> None:
    config = KimiWebEmulatorConfig.simple(quota_turns=2, quota_window=3600, quota_mode=mode)
    async with running(config) as run:
        token = run.token()
        first = await run.turn(token)
        run.clock.advance(600)
        await run.turn(token, request(chat_id=first.chat_id()))
        response = await run.chat(token, envelope(request(chat_id=first.chat_id())))
        if mode == "http":
            assert response.status_code == 429
            assert response.json()["code"] == "resource_exhausted"
            assert "try again in 3000 seconds" in response.json()["message"]
        elif mode == "stream":
            code, message = error_of(Decoded(response.content))
            assert code == "resource_exhausted" and "usage limit reached" in message
        else:
            got = Decoded(response.content)
            assert got.end == {} and got.kinds == ["chat", "message", "message", "block.text", "message.status", "done"]
            assert got.content() == USAGE_LIMIT_TEXT
            assert got.frames[4]["message"] == {"id": got.reply_id(), "status": "MESSAGE_STATUS_FAILED"}
            assert run.emulator.chats[first.chat_id()].messages[-1].status == "MESSAGE_STATUS_FAILED"
        assert (await run.turn(run.token(OTHER))).end == {}, "the quota is per user"
        run.clock.advance(3000)
        third = await run.turn(token, request(chat_id=first.chat_id()))
        assert third.end == {} and third.content().startswith("Turn " + ("4" if mode == "status" else "3"))
        stats = run.emulator.stats.users[USER]
        assert stats.by_code == {"ok": 3, "resource_exhausted": 1} and stats.turns == 3
        assert run.emulator.snapshot()["users"][USER]["quota_used"] == 2


async def test_one_stream_per_user_refuses_a_second_with_aborted() -> None:
    async with running() as run:
        token = run.token()
        run.emulator.script(token, [{"kind": "hold_after", "chunks": 1}])
        held = asyncio.create_task(run.turn(token))
        await run.emulator.wait_for(lambda e: e.held == 1)
        code, message = error_of(await run.turn(run.token()))
        assert (code, message) == ("aborted", "another reply is still being generated for this user")
        assert (await run.turn(run.token(OTHER))).end == {}, "another user streams meanwhile"
        assert run.emulator.stats.peak_in_flight == 2 and run.emulator.stats.users[USER].peak_in_flight == 1
        assert run.emulator.release() == 1
        got = await held
        assert got.end == {} and got.content() == REPLY
        assert (await run.turn(token)).end == {}, "the user's slot is free again"
    async with running(KimiWebEmulatorConfig.simple(one_stream_per_user=False)) as run:
        token = run.token()
        run.emulator.script(None, [{"kind": "hold_after"}])
        held = asyncio.create_task(run.turn(token))
        await run.emulator.wait_for(lambda e: e.held == 1)
        assert (await run.turn(token)).end == {}
        run.emulator.release()
        assert (await held).end == {} and run.emulator.stats.users[USER].peak_in_flight == 2


# --- scripted faults -----------------------------------------------------------------------------------


async def test_drop_after_cuts_the_connection_without_an_end_of_stream_frame() -> None:
    async with running() as run:
        token = run.token()
        run.emulator.script(token, [{"kind": "drop_after", "chunks": 2}])
        async with run.stream(token) as response:
            assert response.status_code == 200
            data, cut = await received(response)
        got = Decoded(data)
        assert cut and got.end is None and got.rest == b""
        assert got.kinds == ["chat", "message", "message", "block.text", "block.text.content"]
        assert got.content() == "Turn 1 of chat: Hello"
        await run.emulator.wait_for(lambda e: e.stats.dropped == 1)
        stats = run.emulator.stats
        assert (stats.in_flight, stats.completed_streams, stats.by_code) == (0, 0, {})
        reply = run.emulator.chats[got.chat_id()].messages[1]
        assert (reply.content, reply.status) == ("Turn 1 of chat: Hello", "MESSAGE_STATUS_FAILED")
        assert (await run.turn(token)).end == {}, "the next stream is whole"


async def test_drop_before_end_sends_done_but_no_end_of_stream_frame() -> None:
    async with running() as run:
        token = run.token()
        run.emulator.script(None, [{"kind": "drop_before_end"}])
        async with run.stream(token) as response:
            data, cut = await received(response)
        got = Decoded(data)
        assert cut and got.end is None and got.kinds[-1] == "done" and got.content() == REPLY
        await run.emulator.wait_for(lambda e: e.stats.dropped == 1 and e.stats.in_flight == 0)


async def test_error_frame_after_ends_the_stream_with_an_error() -> None:
    async with running() as run:
        token = run.token()
        run.emulator.script(token, [{"kind": "error_frame_after", "chunks": 3},
                                    {"kind": "error_frame_after", "code": "unavailable", "message": "scaling"}])
        got = await run.turn(token)
        assert got.end == {"error": {"code": "internal", "message": "an internal error occurred"}}
        assert got.content() == "Turn 1 of chat: Hello from" and "done" not in got.kinds
        again = await run.turn(token)
        assert again.end == {"error": {"code": "unavailable", "message": "scaling"}}
        assert again.kinds == ["chat", "message", "message"]
        assert run.emulator.stats.by_code == {"internal": 1, "unavailable": 1}


async def test_no_done_ends_cleanly_without_the_done_frame() -> None:
    async with running() as run:
        token = run.token()
        run.emulator.script(token, [{"kind": "no_done"}])
        got = await run.turn(token)
        assert got.end == {} and "done" not in got.kinds and got.kinds[-1] == "chat.name"
        stats = run.emulator.stats
        assert (stats.by_code, stats.completed_streams) == ({"ok": 1}, 0)


async def test_a_delayed_first_token_waits_on_the_clock() -> None:
    async with running() as run:
        token = run.token()
        run.emulator.script(token, [{"kind": "delay_first_token", "seconds": 30}])
        reply = asyncio.create_task(run.turn(token))
        await run.clock.wait_for_sleepers(1)
        run.clock.advance(29)
        assert run.clock.sleepers == 1 and not reply.done() and run.emulator.stats.in_flight == 1
        run.clock.advance(1)
        assert (await reply).content() == REPLY


async def test_scripted_http_errors_and_refusals() -> None:
    async with running() as run:
        token = run.token()
        run.emulator.script(token, [
            {"kind": "http_error"}, {"kind": "http_error", "status": 502, "message": "bad gateway"},
            {"kind": "unauthenticated"}, {"kind": "unauthenticated", "mode": "http"},
            {"kind": "resource_exhausted"}, {"kind": "resource_exhausted", "mode": "http"},
            {"kind": "ok"},
        ])
        first = await run.chat(token)
        assert (first.status_code, first.json()) == (
            503, {"code": "unavailable", "message": "the service is temporarily unavailable"})
        second = await run.chat(token)
        assert (second.status_code, second.json()["message"]) == (502, "bad gateway")
        assert error_of(Decoded((await run.chat(token)).content))[0] == "unauthenticated"
        assert (await run.chat(token)).status_code == 401
        assert error_of(Decoded((await run.chat(token)).content)) == (
            "resource_exhausted", "usage limit reached; please try again later")
        assert (await run.chat(token)).status_code == 429
        assert (await run.turn(token)).end == {}
        assert (await run.turn(token)).end == {}, "scripts are consumed one per request"
        assert run.emulator.stats.users[USER].by_code == {
            "unavailable": 2, "unauthenticated": 2, "resource_exhausted": 2, "ok": 2}
        with pytest.raises(ValueError, match="mode must be one of"):
            run.emulator.script(None, [{"kind": "resource_exhausted", "mode": "later"}])
        with pytest.raises(ValueError, match="unknown outcome kind"):
            run.emulator.script(None, [{"kind": "explode"}])


async def test_pacing_follows_the_first_token_delay_and_the_chunk_interval() -> None:
    config = KimiWebEmulatorConfig.simple(first_token_delay=2.0, chunk_interval=0.5, reply_words=2, heartbeat_every=0)
    async with running(config) as run:
        token = run.token()
        async with run.stream(token) as response:
            chunks = response.aiter_raw()
            data = b""

            async def frames_until(count: int) -> Decoded:
                nonlocal data
                while len((got := Decoded(data)).frames) + (got.end is not None) < count:
                    data += await anext(chunks)
                return got

            assert (await frames_until(3)).kinds == ["chat", "message", "message"]
            await run.clock.wait_for_sleepers(1)
            run.clock.advance(2.0)
            assert (await frames_until(4)).content() == "Turn 1 of chat:"
            for expected in ("Turn 1 of chat: Hello", "Turn 1 of chat: Hello from"):
                await run.clock.wait_for_sleepers(1)
                run.clock.advance(0.5)
                got = await frames_until(len(Decoded(data).frames) + 1)
                assert got.content() == expected
            got = await frames_until(10)  # 9 data frames and the end-of-stream frame
            assert got.kinds[-3:] == ["message.status", "chat.name", "done"] and got.end == {}


async def test_a_client_leaving_a_held_stream_is_noticed_and_frees_its_slot() -> None:
    async with running() as run:
        token = run.token()
        run.emulator.script(token, [{"kind": "hold_after", "chunks": 2}])
        async with run.stream(token) as response:
            async for _ in response.aiter_raw():
                break
            await run.emulator.wait_for(lambda e: e.held == 1)
        await run.emulator.wait_for(lambda e: e.stats.client_disconnects == 1)
        stats = run.emulator.stats
        assert (stats.in_flight, stats.users[USER].in_flight, run.emulator.held) == (0, 0, 0)
        assert stats.completed_streams == 0
        assert (await run.turn(token)).end == {}, "one stream per user: the slot is free again"


async def test_a_client_leaving_a_sleeping_stream_is_noticed() -> None:
    async with running(KimiWebEmulatorConfig.simple(chunk_interval=5.0)) as run:
        async with run.stream(run.token()) as response:
            async for _ in response.aiter_raw():
                break
            await run.clock.wait_for_sleepers(1)
        await run.emulator.wait_for(lambda e: e.stats.client_disconnects == 1 and e.stats.in_flight == 0)
        assert run.clock.sleepers == 0, "the emulator stopped generating"


# --- knobs ---------------------------------------------------------------------------------------------


async def test_heartbeats_follow_every_n_text_appends() -> None:
    async with running() as run:
        for every, beats in ((0, 0), (1, 12), (5, 2)):
            run.emulator.configure({"heartbeat_every": every})
            got = await run.turn(run.token())
            assert got.kinds.count("heartbeat") == beats and got.content() == REPLY


async def test_split_writes_still_decode() -> None:
    async with running(KimiWebEmulatorConfig.simple(split_writes=True, chunk_interval=0.0)) as run:
        token = run.token()
        got = await run.turn(token, request(thinking=True))
        assert got.end == {} and got.content() == REPLY and got.content("think") == THOUGHT
        assert error_of(await run.turn(token, request(chat_id="nope")))[0] == "not_found"
        async with run.stream(token) as response:
            pieces = [chunk async for chunk in response.aiter_raw()]
        assert Decoded(b"".join(pieces)).end == {}


# --- unary RPCs ----------------------------------------------------------------------------------------


async def test_delete_chat_and_batch_delete_chats() -> None:
    async with running() as run:
        token = run.token()
        ids = [(await run.turn(token, request(f"Question {n}"))).chat_id() for n in range(4)]
        theirs = (await run.turn(run.token(OTHER))).chat_id()
        deleted = await run.unary(DELETE, token, {"chat_id": ids[0]})
        assert (deleted.status_code, deleted.json()) == (200, {})
        again = await run.unary(DELETE, token, {"chat_id": ids[0]})
        assert again.status_code == 404 and again.json()["code"] == "not_found"
        assert (await run.unary(DELETE, token, {"chat_id": theirs})).status_code == 404, "not the caller's chat"
        assert (await run.unary(DELETE, token, {})).json()["code"] == "invalid_argument"
        batch = await run.unary(BATCH_DELETE, token, {"chat_ids": [ids[1], ids[2], theirs, "unknown"]})
        assert (batch.status_code, batch.json()) == (200, {})
        assert set(run.emulator.chats) == {ids[3], theirs}
        assert error_of(await run.turn(token, request(chat_id=ids[1])))[0] == "not_found"
        stats = run.emulator.stats
        assert (stats.delete_calls, stats.chats_deleted, stats.chats_created) == (5, 3, 5)


async def test_list_chats_pages_latest_first_and_filters_by_name() -> None:
    async with running() as run:
        token = run.token()
        ids = [(await run.turn(token, request(f"Question {n}"))).chat_id() for n in range(3)]
        await run.turn(token, request("More", chat_id=ids[0]))  # the oldest chat becomes the latest
        await run.turn(run.token(OTHER))
        first = await run.unary(LIST_CHATS, token, {"page_size": 2, "query": ""})
        assert first.json() == {"chats": [{"id": ids[0], "name": "Question 0", "createTime": ISO},
                                          {"id": ids[2], "name": "Question 2", "createTime": ISO}],
                                "nextPageToken": "2"}
        rest = await run.unary(LIST_CHATS, token, {"page_size": 2, "page_token": "2", "query": ""})
        assert [c["id"] for c in rest.json()["chats"]] == [ids[1]] and rest.json()["nextPageToken"] == ""
        found = await run.unary(LIST_CHATS, token, {"page_size": 100, "query": "question 1"})
        assert [c["id"] for c in found.json()["chats"]] == [ids[1]]
        assert (await run.unary(LIST_CHATS, token, {"page_token": "bogus"})).status_code == 400
        assert run.emulator.stats.list_calls == 4


async def test_list_messages_returns_the_chat_oldest_first() -> None:
    async with running() as run:
        token = run.token()
        first = await run.turn(token, request(thinking=True))
        response = await run.unary(LIST_MESSAGES, token, {"chat_id": first.chat_id(), "page_size": 50})
        messages = response.json()["messages"]
        assert [(m["role"], m["status"], m["scenario"], m["createTime"]) for m in messages] == [
            ("user", "MESSAGE_STATUS_COMPLETED", "SCENARIO_K2D5", ISO),
            ("assistant", "MESSAGE_STATUS_COMPLETED", "SCENARIO_K2D5", ISO)]
        assert messages[1]["id"] == first.reply_id() and messages[1]["parentId"] == messages[0]["id"]
        assert messages[0]["blocks"] == [{"id": "1", "text": {"content": "Hello, Kimi!"}}]
        assert messages[1]["blocks"] == [{"id": "0", "think": {"content": THOUGHT}},
                                         {"id": "1", "text": {"content": REPLY}}]
        other = await run.unary(LIST_MESSAGES, run.token(OTHER), {"chat_id": first.chat_id()})
        assert other.status_code == 404 and other.json()["code"] == "not_found"


async def test_get_subscription_checks_the_token_and_unary_errors_are_http() -> None:
    async with running(KimiWebEmulatorConfig.simple(token_ttl=60)) as run:
        token = run.token()
        response = await run.unary(SUBSCRIPTION, token)
        assert response.status_code == 200
        assert response.json()["subscription"]["userId"] == USER and response.json()["subscription"]["userName"]
        run.clock.advance(60)
        for path in (SUBSCRIPTION, LIST_CHATS, DELETE):
            expired = await run.unary(path, token)
            assert expired.status_code == 401 and expired.json() == {
                "code": "unauthenticated", "message": "the access token has expired"}
        assert (await run.unary(SUBSCRIPTION, None)).status_code == 401
        wrong_type = await run.http.post(SUBSCRIPTION, content=b"{}", headers={
            "Authorization": f"Bearer {run.token()}", "Content-Type": "text/plain"})
        assert wrong_type.status_code == 415
        bad_json = await run.http.post(SUBSCRIPTION, content=b"{nope", headers={
            "Authorization": f"Bearer {run.token()}", "Content-Type": "application/json"})
        assert bad_json.status_code == 400 and bad_json.json()["code"] == "invalid_argument"
        assert run.emulator.stats.subscription_calls == 5
        unknown = await run.unary("/apiv2/kimi.chat.v1.ChatService/Explode", run.token())
        assert unknown.status_code == 404 and unknown.json()["code"] == "unimplemented"


# --- control routes ------------------------------------------------------------------------------------


async def test_the_control_routes_over_http() -> None:
    async with running() as run:
        token = (await run.http.post("/__fake/token", json={"user": USER})).json()["token"]
        assert (await run.http.post("/__fake/token", json={"user": "nobody"})).status_code == 400
        first = await run.turn(token)
        state = (await run.http.get("/__fake/state")).json()
        assert state == run.emulator.snapshot()
        assert state["chat_requests"] == 1 and state["by_code"] == {"ok": 1}
        assert state["users"][USER]["quota_used"] == 1 and state["users"][USER]["completed_streams"] == 1
        chat = state["chats"][first.chat_id()]
        assert chat["owner"] == USER and [m["content"] for m in chat["messages"]] == ["Hello, Kimi!", REPLY]
        assert state["config"]["users"] == [USER, OTHER] and state["config"]["reply_words"] == 12

        scripted = await run.http.post("/__fake/script", json={"key": token, "outcomes": [{"kind": "no_done"}]})
        assert scripted.json() == {"queued": 1}
        assert (await run.http.get("/__fake/state")).json()["scripts"] == {token: 1}
        assert "done" not in (await run.turn(token)).kinds

        applied = await run.http.post("/__fake/config", json={"reply_words": 2, "auth_error_mode": "http"})
        assert applied.json()["reply_words"] == 2 and run.emulator.config.auth_error_mode == "http"
        assert (await run.turn(token)).content() == "Turn 1 of chat: Hello from"
        for bad in ({"reply_words": -1}, {"users": ["x"]}, {"quota_mode": "never"}, {"chunk_interval": "x"}):
            assert (await run.http.post("/__fake/config", json=bad)).status_code == 400, bad

        assert (await run.http.post("/__fake/revoke", json={"token": token})).json() == {"revoked": token}
        assert (await run.chat(token)).status_code == 401
        other = run.token(OTHER)
        assert (await run.http.post("/__fake/revoke", json={"user": OTHER})).status_code == 200
        assert (await run.chat(other)).status_code == 401
        for bad_body in ({}, {"user": "nobody"}, {"token": ""}, {"token": "a", "user": USER}):
            assert (await run.http.post("/__fake/revoke", json=bad_body)).status_code == 400, bad_body

        assert (await run.http.post("/__fake/reset")).json() == {"reset": True}
        state = (await run.http.get("/__fake/state")).json()
        assert (state["chat_requests"], state["chats"], state["chats_created"]) == (0, {}, 0)
        assert state["users"][USER]["quota_used"] == 0 and state["revoked_tokens"] == 0
        assert (await run.turn(token)).end == {}, "the reset forgot the revocations"


async def test_wait_for_times_out_when_nothing_happens() -> None:
    emulator = KimiWebEmulator(KimiWebEmulatorConfig.simple(), ManualClock())
    with pytest.raises(TimeoutError):
        await emulator.wait_for(lambda e: e.stats.chat_requests > 0, timeout=0.05)


def test_the_configuration_is_validated() -> None:
    simple = KimiWebEmulatorConfig.simple(3)
    assert simple.users == ("user-000000000000001", "user-000000000000002", "user-000000000000003")
    assert all(len(user) == 20 for user in simple.users)
    bad: list[dict[str, Any]] = [
        {"users": ("a", "a")}, {"users": ("",)}, {"users": "abc"}, {"token_ttl": 0}, {"auth_error_mode": "soap"},
        {"quota_turns": -1}, {"quota_turns": 1.5}, {"quota_window": 0}, {"quota_mode": "teapot"},
        {"one_stream_per_user": 1}, {"first_token_delay": -1}, {"chunk_interval": float("nan")},
        {"reply_words": -1}, {"think_words": True}, {"heartbeat_every": "4"}, {"split_writes": None},
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            KimiWebEmulatorConfig(**{"users": (USER,), **kw})
    emulator = KimiWebEmulator(simple, ManualClock())
    with pytest.raises(ValueError, match="cannot be changed at runtime"):
        emulator.configure({"users": ("x",)})
    with pytest.raises(ValueError, match="unknown user"):
        emulator.token("nobody")
    assert emulator.configure({"quota_turns": 1, "quota_window": 60})["quota_turns"] == 1
