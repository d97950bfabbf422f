"""The kimi-ai.chat emulator under real uvicorn, driven over HTTP the way the site's clients drive it:
fetch the chat page, scrape ``kimi_ajax``, post the form to admin-ajax.php.

Time only moves when a test advances the ``ManualClock``; nothing here sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.clock import ManualClock
from app.emulator.kimi_ai_chat import (
    KimiAiChatEmulator,
    KimiAiChatEmulatorConfig,
    create_kimi_ai_chat_emulator,
)
from tests.conftest import serve

AJAX = "/wp-admin/admin-ajax.php"
MODEL = "moonshotai/Kimi-K2-Instruct-0905"
SESSION = "session_1760000000000_k3x9q2m7ab"
WORDS = "Hello from the kimi-ai.chat emulator, a deterministic reply for testing the gateway."
THROTTLED = "请求过于频繁，请稍后再试 (rate limited)"  # noqa: RUF001 - the site's full-width comma
KIMI_AJAX = re.compile(r"var\s+kimi_ajax\s*=\s*(\{.*?\});", re.DOTALL)
TICK = 12 * 3600


def scrape(html: str) -> dict[str, Any] | None:
    """What the site's clients do: find the ``kimi_ajax`` literal and parse it as JSON."""
    found = KIMI_AJAX.search(html)
    return json.loads(found.group(1)) if found else None


def success(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True, body
    return str(body["data"]["message"])


def failure(response: httpx.Response) -> str:
    assert response.status_code == 200 and response.headers["content-type"] == "application/json; charset=UTF-8"
    body = response.json()
    assert set(body) == {"success", "data"} and body["success"] is False, body
    return str(body["data"])


class Running:
    def __init__(self, url: str, emulator: KimiAiChatEmulator, clock: ManualClock, http: httpx.AsyncClient) -> None:
        self.url = url
        self.emulator = emulator
        self.clock = clock
        self.http = http

    async def nonce(self) -> str:
        response = await self.http.get("/chat/")
        assert response.status_code == 200
        ajax = scrape(response.text)
        assert ajax is not None
        return str(ajax["nonce"])

    async def send(self, message: str | None = "Hello, Kimi!", *, nonce: str | None = None, **fields: str | None,
                   ) -> httpx.Response:
        """Post the form as the clients do; a field given as None is left out."""
        form: dict[str, str | None] = {"action": "kimi_send_message", "nonce": nonce or self.emulator.current_nonce,
                                       "message": message, "model": MODEL, "session_id": SESSION, **fields}
        return await self.http.post(AJAX, data={k: v for k, v in form.items() if v is not None})


@contextlib.asynccontextmanager
async def running(config: KimiAiChatEmulatorConfig | None = None) -> AsyncIterator[Running]:
    clock = ManualClock()
    app = create_kimi_ai_chat_emulator(config, clock=clock)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield Running(url, app.state.emulator, clock, http)


# --- the page ------------------------------------------------------------------------------------------


async def test_the_chat_page_carries_a_parseable_nonce_in_either_layout() -> None:
    async with running() as run:
        first, second = await run.http.get("/chat/"), await run.http.get("/chat/")
        for response in (first, second):
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/html; charset=UTF-8"
            ajax = scrape(response.text)
            assert ajax == {"ajax_url": run.url + AJAX, "nonce": run.emulator.current_nonce}
            assert re.fullmatch(r"[0-9a-f]{10}", ajax["nonce"])
        assert '"ajax_url":"http:\\/\\/127.0.0.1' in first.text, "wp_localize_script escapes slashes"
        assert re.search(r'var kimi_ajax = \{\n\s+"ajax_url": "http://', second.text), "and pretty pages exist"
        assert 'value="moonshotai/Kimi-K2-Instruct"' in first.text and 'maxlength="1000"' in first.text
        assert run.emulator.stats.page_fetches == 2
        assert (await run.http.get("/chat", follow_redirects=True)).url.path == "/chat/"


async def test_a_good_request_is_answered_with_the_deterministic_reply() -> None:
    async with running() as run:
        message = "用户: tell me a story about a lighthouse keeper\n模型: ok\n用户: go on"
        response = await run.send(message, nonce=await run.nonce())
        assert response.headers["content-type"] == "application/json; charset=UTF-8"
        assert success(response) == f"Reply to: {message[-40:]} — {WORDS}"
        assert "\\u2014" in response.text and "用户" not in response.text, "PHP escapes non-ASCII"
        assert response.json() == {"success": True, "data": {"message": f"Reply to: {message[-40:]} — {WORDS}"}}
        stats = run.emulator.stats
        assert (stats.ajax_requests, stats.ok, stats.bad_nonce) == (1, 1, 0)
        assert (stats.in_flight, stats.peak_in_flight) == (0, 1)
        assert (stats.last_message, stats.last_model, stats.last_session_id) == (message, MODEL, SESSION)
        assert stats.answers == {"ok": 1}

    async with running(KimiAiChatEmulatorConfig(reply_words=3)) as run:
        assert success(await run.send("hi", model="moonshotai/Kimi-K2-Instruct")) == "Reply to: hi — Hello from the"


# --- nonces ----------------------------------------------------------------------------------------------


async def test_a_bad_nonce_is_refused_in_the_configured_mode() -> None:
    async with running() as run:
        for mode, status, body in (("wpcore", 403, "-1"), ("wpcore_legacy", 200, "-1"), ("plugin_json", 200, None)):
            run.emulator.configure({"bad_nonce_mode": mode})
            for nonce in ("0123456789", None):
                form = {"action": "kimi_send_message", "message": "hi", "model": MODEL, "nonce": nonce}
                response = await run.http.post(AJAX, data={k: v for k, v in form.items() if v is not None})
                assert response.status_code == status, mode
                if body is None:
                    assert failure(response).endswith("(invalid nonce)")
                else:
                    assert response.text == body and response.headers["content-type"] == "text/html; charset=UTF-8"
        assert run.emulator.stats.bad_nonce == 6 and run.emulator.stats.answers == {"bad_nonce": 6}


async def test_a_nonce_lives_through_its_own_tick_and_the_next() -> None:
    async with running() as run:
        old = await run.nonce()
        run.clock.advance(TICK)
        fresh = await run.nonce()
        assert fresh != old
        success(await run.send(nonce=old))
        run.clock.advance(TICK)
        assert (await run.send(nonce=old)).text == "-1"
        success(await run.send(nonce=fresh))
        assert await run.nonce() not in (old, fresh)


async def test_rotate_nonce_issues_a_fresh_one_and_retires_the_oldest() -> None:
    async with running() as run:
        first = run.emulator.current_nonce
        second = run.emulator.rotate_nonce()
        assert second != first and await run.nonce() == second
        success(await run.send(nonce=first))
        rotated = (await run.http.post("/__fake/rotate")).json()
        assert rotated == {"nonce": run.emulator.current_nonce, "previous_nonce": second}
        assert (await run.send(nonce=first)).status_code == 403, "two rotations retire a nonce"
        success(await run.send(nonce=second))
        success(await run.send(nonce=rotated["nonce"]))


async def test_nonces_come_from_the_seed_and_the_tick() -> None:
    config = KimiAiChatEmulatorConfig(nonce_seed="fixed")
    one = create_kimi_ai_chat_emulator(config, clock=ManualClock()).state.emulator
    two = create_kimi_ai_chat_emulator(config, clock=ManualClock()).state.emulator
    other = create_kimi_ai_chat_emulator(KimiAiChatEmulatorConfig(nonce_seed="other"), clock=ManualClock())
    assert one.current_nonce == two.current_nonce != other.state.emulator.current_nonce
    assert len({one.nonce_of(tick) for tick in range(100)}) == 100


async def test_a_stale_page_keeps_serving_a_nonce_that_rotation_retires() -> None:
    async with running() as run:
        applied = (await run.http.post("/__fake/config", json={"page_mode": "stale"})).json()
        assert applied["page_mode"] == "stale"
        cached = await run.nonce()
        run.emulator.rotate_nonce()
        run.clock.advance(TICK)
        page = await run.http.get("/chat/")
        assert page.headers["cf-cache-status"] == "HIT"
        assert scrape(page.text) == {"ajax_url": run.url + AJAX, "nonce": cached}
        assert (await run.send(nonce=cached)).text == "-1"
        run.emulator.configure({"page_mode": "ok"})
        success(await run.send(nonce=await run.nonce()))


async def test_fault_pages_carry_no_kimi_ajax() -> None:
    async with running() as run:
        for mode, status in (("challenge_403", 403), ("challenge_503", 503), ("no_nonce", 200)):
            await run.http.post("/__fake/config", json={"page_mode": mode})
            page = await run.http.get("/chat/")
            assert page.status_code == status and page.headers["content-type"] == "text/html; charset=UTF-8"
            assert scrape(page.text) is None and "nonce" not in page.text
            assert ("Just a moment..." in page.text) is mode.startswith("challenge")
            assert (page.headers.get("cf-mitigated") == "challenge") is mode.startswith("challenge")
            assert run.emulator.snapshot()["page_nonce"] is None
        assert success(await run.send()), "the page mode leaves the ajax endpoint alone"


# --- the form and its checks ----------------------------------------------------------------------------


async def test_a_long_message_is_truncated_or_rejected_per_policy() -> None:
    config = KimiAiChatEmulatorConfig(max_message_chars=10)
    async with running(config) as run:
        assert success(await run.send("abcdefghijKLMNOP")) == f"Reply to: abcdefghij — {WORDS}"
        assert run.emulator.stats.last_message == "abcdefghij"
        assert run.emulator.stats.truncated_messages == 1
        success(await run.send("abcdefghij"))
        assert run.emulator.stats.truncated_messages == 1, "exactly the limit is kept whole"
        run.emulator.configure({"message_policy": "reject"})
        assert failure(await run.send("abcdefghijKLMNOP")) == "message too long (16 characters, the limit is 10)"
        assert run.emulator.stats.last_message == "abcdefghijKLMNOP"
        assert run.emulator.stats.answers == {"ok": 2, "too_long": 1}


async def test_a_missing_or_unknown_action_answers_zero_with_400() -> None:
    async with running() as run:
        for response in (await run.send(action="kimi_other"), await run.send(action=None),
                         await run.http.post(AJAX, json={"action": "kimi_send_message"})):
            assert (response.status_code, response.text) == (400, "0")
        assert run.emulator.stats.answers == {"bad_action": 3}
        assert run.emulator.stats.last_message is None, "only kimi_send_message requests are recorded"


async def test_unknown_model_and_empty_message_are_refused() -> None:
    async with running() as run:
        assert failure(await run.send(model="gpt-4")) == "Invalid model"
        assert failure(await run.send(model=None)) == "Invalid model"
        assert failure(await run.send("")) == "Message is empty"
        assert failure(await run.send(message=None)) == "Message is empty"
        assert failure(await run.send(" \n ")) == "Message is empty"
        assert run.emulator.stats.answers == {"invalid_model": 2, "empty": 3}


async def test_throttle_counts_admitted_requests_in_a_window_on_the_clock() -> None:
    async with running(KimiAiChatEmulatorConfig(throttle_requests=2, throttle_window=60)) as run:
        success(await run.send())
        run.clock.advance(30)
        success(await run.send())
        assert failure(await run.send()) == THROTTLED
        run.clock.advance(30)
        success(await run.send())
        assert failure(await run.send()) == THROTTLED
        assert run.emulator.stats.throttled == 2
        await run.http.post("/__fake/config", json={"throttle_requests": None})
        success(await run.send())


async def test_latency_holds_the_answer_until_the_clock_moves() -> None:
    async with running(KimiAiChatEmulatorConfig(latency=30)) as run:
        reply = asyncio.create_task(run.send())
        await run.clock.wait_for_sleepers(1)
        assert run.emulator.stats.in_flight == 1 and not reply.done()
        run.clock.advance(29)
        assert run.clock.sleepers == 1
        run.clock.advance(1)
        success(await reply)
        assert run.emulator.stats.in_flight == 0
        assert (await run.send(nonce="bad")).status_code == 403, "refusals do not wait"


async def test_a_client_leaving_during_the_latency_is_noticed() -> None:
    async with running(KimiAiChatEmulatorConfig(latency=30)) as run:
        reply = asyncio.create_task(run.send())
        await run.clock.wait_for_sleepers(1)
        reply.cancel()
        await run.emulator.wait_for(lambda e: e.stats.answers.get("disconnect") == 1 and e.stats.in_flight == 0)
        assert run.clock.sleepers == 0 and run.emulator.stats.ok == 0


# --- scripted outcomes -----------------------------------------------------------------------------------


async def test_reset_cuts_the_connection_before_any_answer() -> None:
    async with running() as run:
        run.emulator.script(None, [{"kind": "reset"}])
        with pytest.raises(httpx.RemoteProtocolError):
            await run.send()
        success(await run.send())
        assert run.emulator.stats.answers == {"reset": 1, "ok": 1}


async def test_truncate_sends_part_of_the_json_then_cuts() -> None:
    async with running() as run:
        run.emulator.script(None, [{"kind": "truncate"}])
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            async with run.http.stream("POST", AJAX, data={"action": "kimi_send_message", "message": "hi",
                                                           "nonce": run.emulator.current_nonce, "model": MODEL}) as r:
                length = int(r.headers["content-length"])
                async for data in r.aiter_bytes():
                    received += data
        assert 0 < len(received) < length and received.startswith(b'{"success":true')
        with pytest.raises(json.JSONDecodeError):
            json.loads(received)
        await run.emulator.wait_for(lambda e: e.stats.answers.get("truncate") == 1 and e.stats.in_flight == 0)
        assert run.emulator.stats.ok == 0


async def test_html_200_is_an_interstitial_instead_of_json() -> None:
    async with running() as run:
        run.emulator.script(None, [{"kind": "html_200"}])
        response = await run.send()
        assert response.status_code == 200 and response.headers["content-type"] == "text/html; charset=UTF-8"
        assert "<title>Just a moment...</title>" in response.text
        with pytest.raises(json.JSONDecodeError):
            response.json()


async def test_http_error_answers_a_status_page() -> None:
    async with running() as run:
        run.emulator.script(None, [{"kind": "http_error"}, {"kind": "http_error", "status": 503, "body": "text"}])
        response = await run.send(nonce="ignored: a scripted answer comes first")
        assert response.status_code == 502 and response.headers["content-type"] == "text/html; charset=UTF-8"
        assert "<title>kimi-ai.chat | 502: Bad Gateway</title>" in response.text
        response = await run.send()
        assert (response.status_code, response.text) == (503, "error code: 503")
        assert run.emulator.stats.answers == {"http_error": 2}


async def test_hold_waits_for_release() -> None:
    async with running() as run:
        run.emulator.script(None, [{"kind": "hold"}, {"kind": "hold"}])
        first, second = asyncio.create_task(run.send("one")), asyncio.create_task(run.send("two"))
        await run.emulator.wait_for(lambda e: e.held == 2)
        assert not first.done() and run.emulator.stats.peak_in_flight == 2
        assert (await run.http.post("/__fake/release")).json() == {"released": 2}
        assert success(await first).startswith("Reply to: one") and success(await second).startswith("Reply to: two")


async def test_other_scripted_outcomes_play_in_order() -> None:
    async with running(KimiAiChatEmulatorConfig(bad_nonce_mode="wpcore_legacy")) as run:
        run.emulator.script("ignored-key", [
            {"kind": "bad_nonce"}, {"kind": "bad_nonce", "mode": "plugin_json"}, {"kind": "throttled"},
            {"kind": "success_false", "message": "upstream busy"}, {"kind": "ok"}, {"kind": "delay", "seconds": 5}])
        assert run.emulator.snapshot()["scripts"] == {"*": 6}
        assert (await run.send()).text == "-1"
        assert failure(await run.send()).endswith("(invalid nonce)")
        assert failure(await run.send()) == THROTTLED
        assert failure(await run.send()) == "upstream busy"
        success(await run.send())
        delayed = asyncio.create_task(run.send())
        await run.clock.wait_for_sleepers(1)
        run.clock.advance(5)
        success(await delayed)
        stats = run.emulator.stats
        assert (stats.bad_nonce, stats.throttled, stats.ok) == (2, 1, 2)


async def test_a_request_failing_a_check_uses_up_a_shaping_outcome() -> None:
    async with running() as run:
        run.emulator.script(None, [{"kind": "truncate"}])
        assert (await run.send(nonce="stale")).text == "-1"
        success(await run.send())


async def test_bad_scripts_are_refused_whole() -> None:
    async with running() as run:
        with pytest.raises(ValueError, match="unknown outcome kind"):
            run.emulator.script(None, [{"kind": "ok"}, {"kind": "explode"}])
        with pytest.raises(ValueError, match="status must be >= 400"):
            run.emulator.script(None, [{"kind": "http_error", "status": 200}])
        refused = await run.http.post("/__fake/script", json={"outcomes": [{"kind": "bad_nonce", "mode": "x"}]})
        assert refused.status_code == 400 and "mode must be one of" in refused.text
        assert run.emulator.snapshot()["scripts"] == {}


# --- control routes and configuration ----------------------------------------------------------------------


async def test_the_control_routes_report_configure_and_reset() -> None:
    async with running() as run:
        queued = await run.http.post("/__fake/script", json={"key": "*", "outcomes": [{"kind": "throttled"}] * 2})
        assert queued.json() == {"queued": 2}
        failure(await run.send())
        await run.http.get("/chat/")
        state = (await run.http.get("/__fake/state")).json()
        assert state == run.emulator.snapshot()
        assert state["nonce"] == run.emulator.current_nonce and state["page_nonce"] == state["nonce"]
        assert state["previous_nonce"] == run.emulator.previous_nonce
        assert (state["ajax_requests"], state["throttled"], state["page_fetches"]) == (1, 1, 1)
        assert state["scripts"] == {"*": 1} and state["last_session_id"] == SESSION
        assert state["config"]["models"] == list(KimiAiChatEmulatorConfig().models)

        applied = (await run.http.post("/__fake/config", json={
            "bad_nonce_mode": "plugin_json", "latency": 2.5, "models": ["kimi-x"]})).json()
        assert (applied["bad_nonce_mode"], applied["latency"], applied["models"]) == ("plugin_json", 2.5, ["kimi-x"])
        assert run.emulator.config.models == ("kimi-x",)
        bad_changes: tuple[dict[str, Any], ...] = (
            {"latency": -1}, {"page_mode": "broken"}, {"nonce_seed": "x"}, {"reply_words": True}, {"models": []},
            {"throttle_window": 0}, {"max_message_chars": "10"}, {"bad_nonce_mode": None})
        for bad in bad_changes:
            response = await run.http.post("/__fake/config", json=bad)
            assert response.status_code == 400, bad
        assert run.emulator.config.latency == 2.5, "a refused change changes nothing"

        assert (await run.http.post("/__fake/reset")).json() == {"reset": True}
        state = (await run.http.get("/__fake/state")).json()
        assert state["scripts"] == {} and state["ajax_requests"] == 0 and state["answers"] == {}
        assert state["last_message"] is None and state["nonce"] == run.emulator.current_nonce


@pytest.mark.parametrize(("changes", "problem"), [
    ({"nonce_tick": 0}, "nonce_tick must be a positive number"),
    ({"bad_nonce_mode": "json"}, "bad_nonce_mode must be one of wpcore, wpcore_legacy, plugin_json"),
    ({"max_message_chars": 0}, "max_message_chars must be a positive integer"),
    ({"message_policy": "drop"}, "message_policy must be one of truncate, reject"),
    ({"latency": float("nan")}, "latency must be a non-negative number"),
    ({"reply_words": 0}, "reply_words must be a positive integer"),
    ({"models": ["a"]}, "models must be a non-empty tuple"),
    ({"page_mode": "down"}, "page_mode must be one of"),
    ({"throttle_requests": -1}, "throttle_requests must be a non-negative integer or None"),
    ({"throttle_window": -5}, "throttle_window must be a positive number"),
])
def test_the_config_refuses_bad_values(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        KimiAiChatEmulatorConfig(**changes)


async def test_wait_for_times_out_when_nothing_happens() -> None:
    async with running() as run:
        with pytest.raises(TimeoutError):
            await run.emulator.wait_for(lambda e: e.stats.ajax_requests > 0, timeout=0.05)


async def test_unknown_paths_get_an_html_404() -> None:
    async with running() as run:
        response = await run.http.get("/wp-login.php")
        assert response.status_code == 404 and "Page not found" in response.text
