"""The admin API (``/admin/…``) on a real gateway and emulator: the master key only, the CLI's views and
messages, and every change serving traffic before the response arrives (no sync tick waited for)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.cli import run
from app.emulator.kimi_web import mint_jwt
from app.emulator.moonshot import MoonshotEmulatorConfig
from tests.api.test_errors import assert_error
from tests.conftest import MASTER_KEY, Stack, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
NEW_KEY = "sk-emu-0003"  # issued by the emulator, not yet in the pool
NEVER_ISSUED = "sk-never-issued-0123456789"
DAY = 86400.0


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """Emulator keys sk-emu-0001…0004; the pool has acct-1 (0001) and acct-2 (0002)."""
    async with run_stack(tmp_path, keys=["sk-emu-0001", "sk-emu-0002"],
                         emulator=MoonshotEmulatorConfig.simple(4)) as stack:
        yield stack


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url + "/admin", headers=AUTH, timeout=10) as client:
        yield client


async def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


async def served_by(stack: Stack, model: str = MODEL, client: openai.AsyncOpenAI | None = None) -> str:
    raw = await (client or stack.client()).chat.completions.with_raw_response.create(model=model, messages=HELLO)
    return raw.headers["x-kimi-pool-account"]


async def pool_states(stack: Stack) -> dict[str, str]:
    async with stack.http() as http:
        status = (await http.get("/v1/pool/status", headers=AUTH)).json()
    return {account["name"]: account["state"] for account in status["accounts"]}


def new_account(**fields: Any) -> dict[str, Any]:
    return {"name": "acct-new", "kind": "moonshot", "api_key": NEW_KEY, **fields}


# --- who may call it --------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"},
                                     {"Authorization": "Bearer caf\xe9".encode("latin-1")}])
async def test_no_key_or_a_wrong_one_is_401_even_for_unknown_paths(stack: Stack, headers: dict[str, Any]) -> None:
    async with stack.http() as http:
        for path in ("/admin/accounts", "/admin/no-such-thing"):
            assert_error(await http.get(path, headers=headers), 401, "authentication_error", code="invalid_api_key")


async def test_a_client_key_is_403_and_the_master_key_passes_either_way(stack: Stack,
                                                                        admin: httpx.AsyncClient) -> None:
    key = (await ok(await admin.post("/keys", json={"name": "app"}), 201))["key"]
    async with stack.http() as http:
        for headers in ({"Authorization": f"Bearer {key}"}, {"X-Api-Key": key}):
            denied = await http.get("/admin/accounts", headers=headers)
            assert_error(denied, 403, "permission_error", code="permission_denied")
            assert "master key" in denied.json()["error"]["message"]
        assert (await http.get("/admin/accounts", headers={"X-Api-Key": MASTER_KEY})).status_code == 200
        assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code == 200


async def test_without_a_master_key_the_admin_api_is_refused_entirely(tmp_path: Path) -> None:
    async with run_stack(tmp_path, settings={"master_key": None}) as stack, stack.http() as http:
        assert (await http.get("/v1/models")).status_code == 200, "the gateway itself is open on loopback"
        for headers in ({}, AUTH, {"X-Api-Key": "anything"}):
            for method, path in (("GET", "/admin/accounts"), ("POST", "/admin/keys"), ("GET", "/admin/nope")):
                refused = await http.request(method, path, headers=headers, json={"name": "k"})
                assert_error(refused, 403, "permission_error", code="admin_api_disabled")
                assert "KIMI_POOL_MASTER_KEY" in refused.json()["error"]["message"]
        assert stack.gateway.auth.open, "no key was created"


# --- accounts ---------------------------------------------------------------------------------------


async def test_an_added_account_is_listed_masked_and_serves_at_once(stack: Stack, admin: httpx.AsyncClient,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kimi_pool")  # (serve keeps aiosqlite, which logs SQL values, at INFO)
    body = new_account(base_url=stack.emulator_url + "/v1", rpm=100, models=[MODEL])
    added = await ok(await admin.post("/accounts", json=body), 201)
    assert (added["name"], added["state"], added["key"], added["rpm"]) == ("acct-new", "active", "****", 100)
    assert (await ok(await admin.get("/accounts/acct-new"))) == added

    listed = await ok(await admin.get("/accounts"))
    assert listed["object"] == "list" and [a["name"] for a in listed["data"]] == ["acct-1", "acct-2", "acct-new"]
    code = await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "list", "--json"])
    assert code == 0
    assert listed["data"] == json.loads(capsys.readouterr().out), "the CLI's view, field for field"

    for name in ("acct-1", "acct-2"):
        await ok(await admin.post(f"/accounts/{name}/disable"))
    assert await served_by(stack) == "acct-new"
    assert stack.emulator.snapshot()["keys"][NEW_KEY]["requests"] == 1

    proxied = await ok(await admin.post("/accounts", json={"name": "via-proxy", "kind": "kimi-ai-chat",
                                                           "proxy": "http://user:hunter2@127.0.0.1:9"}), 201)
    assert proxied["proxy"] == "http://***@127.0.0.1:9"
    everything = json.dumps(listed) + json.dumps(proxied) + (await admin.get("/accounts")).text + caplog.text
    assert NEW_KEY not in everything and "hunter2" not in everything
    assert "admin: added account acct-new (moonshot)" in caplog.text


async def test_patch_changes_limits_and_the_pool_paces_by_them_at_once(stack: Stack,
                                                                       admin: httpx.AsyncClient) -> None:
    patched = await ok(await admin.patch("/accounts/acct-1", json={"rpm": 1, "weight": 2, "keep_chats": None}))
    assert (patched["rpm"], patched["weight"], patched["config_rev"], patched["key"]) == (1, 2.0, 2, "****")
    async with stack.http() as http:
        status = (await http.get("/v1/pool/status", headers=AUTH)).json()
    [acct_1] = [a for a in status["accounts"] if a["name"] == "acct-1"]
    assert (acct_1["configured"]["rpm"], acct_1["weight"]) == (1, 2.0)

    await ok(await admin.post("/accounts/acct-2/disable"))
    assert await served_by(stack) == "acct-1"
    with pytest.raises(openai.RateLimitError):  # its one request a minute is spent: the pool says so itself
        await stack.client().chat.completions.create(model=MODEL, messages=HELLO,
                                                     extra_headers={"X-Kimi-Pool-Max-Wait": "0"})
    assert stack.emulator.snapshot()["totals"]["requests"] == 1

    cleared = await ok(await admin.patch("/accounts/acct-1", json={"rpm": None}))
    assert cleared["rpm"] is None and cleared["weight"] == 2.0
    assert await served_by(stack) == "acct-1"
    unchanged = await ok(await admin.patch("/accounts/acct-1", json={"name": "acct-1"}))
    assert unchanged["config_rev"] == cleared["config_rev"]


async def test_a_change_keeps_what_the_server_has_learnt_meanwhile(stack: Stack, admin: httpx.AsyncClient) -> None:
    """The account is rebuilt from its row: the cooldown of a second ago must be in that row by then."""
    stack.emulator.script(None, [{"kind": "rate_limit", "bucket": "rpm", "wait": 30}])
    other = await served_by(stack)
    cooled = "acct-1" if other == "acct-2" else "acct-2"
    assert (await pool_states(stack))[cooled] == "cooling_down"
    changed = await ok(await admin.patch(f"/accounts/{cooled}", json={"tpm": 50_000}))
    assert (changed["state"], changed["until"], changed["tpm"]) == ("cooling_down", stack.clock.time() + 30, 50_000)
    assert (await pool_states(stack))[cooled] == "cooling_down"
    assert [await served_by(stack) for _ in range(3)] == [other] * 3


async def test_patch_is_validated_as_a_whole(stack: Stack, admin: httpx.AsyncClient) -> None:
    renamed = await admin.patch("/accounts/acct-1", json={"name": "acct-9"})
    assert_error(renamed, 400, "invalid_request_error", param="name")
    to_web = await admin.patch("/accounts/acct-1", json={"kind": "kimi-web"})
    assert_error(to_web, 400, "invalid_request_error", param="token")  # its sk- key is no kimi.com token
    assert "the kimi-web token is not a JWT" in to_web.json()["error"]["message"]
    assert_error(await admin.patch("/accounts/acct-1", json={"rpm": -5}), 400, "invalid_request_error", param="rpm")
    assert_error(await admin.patch("/accounts/acct-1", json={"api_key": None}), 400, "invalid_request_error",
                 param="api_key")
    assert_error(await admin.patch("/accounts/nope", json={"rpm": 5}), 404, "invalid_request_error",
                 code="not_found")
    assert (await ok(await admin.get("/accounts/acct-1")))["config_rev"] == 1, "nothing was written"


async def test_disable_takes_an_account_out_and_enable_brings_it_back(stack: Stack,
                                                                      admin: httpx.AsyncClient) -> None:
    disabled = await ok(await admin.post("/accounts/acct-1/disable", json={"reason": "rotating the key"}))
    assert (disabled["state"], disabled["reason"], disabled["enabled"]) == ("disabled", "rotating the key", False)
    assert (await pool_states(stack))["acct-1"] == "disabled"
    assert [await served_by(stack) for _ in range(4)] == ["acct-2"] * 4
    assert stack.emulator.snapshot()["keys"]["sk-emu-0001"]["requests"] == 0

    by_default = await ok(await admin.post("/accounts/acct-2/disable"))
    assert by_default["reason"] == "disabled by operator"
    enabled = await ok(await admin.post("/accounts/acct-1/enable"))
    assert (enabled["state"], enabled["reason"], enabled["enabled"]) == ("active", None, True)
    assert (await pool_states(stack)) == {"acct-1": "active", "acct-2": "disabled"}
    assert await served_by(stack) == "acct-1"

    again = await ok(await admin.patch("/accounts/acct-2", json={"enabled": True}))
    assert again["state"] == "active" and (await pool_states(stack))["acct-2"] == "active"
    assert_error(await admin.post("/accounts/nope/disable"), 404, "invalid_request_error", code="not_found")
    assert_error(await admin.post("/accounts/acct-1/disable", json={"reason": 5}), 400, "invalid_request_error",
                 param="reason")
    assert_error(await admin.post("/accounts/acct-1/enable", json={"force": True}), 400, "invalid_request_error",
                 param="force")


async def test_delete_removes_an_account_from_the_pool(stack: Stack, admin: httpx.AsyncClient) -> None:
    assert await ok(await admin.delete("/accounts/acct-2")) == {"name": "acct-2", "deleted": True}
    assert list(await pool_states(stack)) == ["acct-1"]
    assert [await served_by(stack) for _ in range(3)] == ["acct-1"] * 3
    assert_error(await admin.get("/accounts/acct-2"), 404, "invalid_request_error", code="not_found")
    assert_error(await admin.delete("/accounts/acct-2"), 404, "invalid_request_error", code="not_found")


async def test_probe_of_a_good_and_a_bad_key(stack: Stack, admin: httpx.AsyncClient) -> None:
    await ok(await admin.post("/accounts", json=new_account(name="revoked", api_key=NEVER_ISSUED,
                                                            base_url=stack.emulator_url + "/v1")), 201)
    bad = await ok(await admin.post("/accounts/revoked/probe"))
    assert (bad["name"], bad["before"], bad["after"], bad["outcome"]) == ("revoked", "active", "auth_dead", "failed")
    assert "rejected the API key" in bad["detail"] and NEVER_ISSUED not in json.dumps(bad)
    assert (await pool_states(stack))["revoked"] == "auth_dead"
    assert (await ok(await admin.get("/accounts/revoked")))["state"] == "auth_dead"

    good = await ok(await admin.post("/accounts/acct-1/probe"))
    assert (good["before"], good["after"], good["outcome"]) == ("active", "active", "ok")
    assert good["detail"] == f"ok; serves {len(good['models'])} model(s)" and "kimi-k3" in good["models"]
    assert stack.emulator.snapshot()["totals"]["requests"] == 0, "probing spends no chat request"
    assert_error(await admin.post("/accounts/nope/probe"), 404, "invalid_request_error", code="not_found")


# --- validation: the CLI's checks and messages, as OpenAI errors naming the field ---------------------


async def cli_error(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = await asyncio.to_thread(run, ["--db", stack.db_url, *args])
    line = capsys.readouterr().err
    assert code == 1, line
    return line.removeprefix("kimi-pool: error: ").rstrip("\n")


def expired_token(stack: Stack) -> str:
    return mint_jwt("user-1", now=stack.clock.time() - 40 * DAY, ttl=30 * DAY)


@pytest.mark.parametrize(("body", "param", "cli"), [
    ({"name": "x", "kind": "claude"}, "kind", ["--kind", "claude"]),
    ({"name": "x", "kind": "moonshot"}, "api_key", ["--kind", "moonshot"]),
    ({"name": "x", "kind": "kimi-ai-chat", "rpm": 0}, "rpm", ["--kind", "kimi-ai-chat", "--rpm", "0"]),
    ({"name": "x", "kind": "kimi-ai-chat", "weight": -1.5}, "weight", ["--kind", "kimi-ai-chat", "--weight", "-1.5"]),
    ({"name": "x", "kind": "kimi-ai-chat", "proxy": "gopher://u:hunter2@p"}, "proxy",
     ["--kind", "kimi-ai-chat", "--proxy", "gopher://u:hunter2@p"]),
    ({"name": "x", "kind": "moonshot", "api_key": "k", "base_url": "ftp://h"}, "base_url",
     ["--kind", "moonshot", "--api-key", "k", "--base-url", "ftp://h"]),
    ({"name": "x", "kind": "moonshot", "api_key": "k", "max_message_chars": 10}, "max_message_chars",
     ["--kind", "moonshot", "--api-key", "k", "--max-message-chars", "10"]),
    ({"name": "x", "kind": "kimi-web", "token": "EXPIRED"}, "token", ["--kind", "kimi-web", "--token", "EXPIRED"]),
    ({"name": "x", "kind": "kimi-web", "token": "not-a-jwt"}, "token", ["--kind", "kimi-web", "--token", "not-a-jwt"]),
    ({"name": "x y", "kind": "kimi-ai-chat"}, "name", None),
])
async def test_bad_accounts_get_the_clis_message_as_a_400_naming_the_field(
        stack: Stack, admin: httpx.AsyncClient, capsys: pytest.CaptureFixture[str],
        body: dict[str, Any], param: str, cli: list[str] | None) -> None:
    token = expired_token(stack)
    body = {k: token if v == "EXPIRED" else v for k, v in body.items()}
    response = await admin.post("/accounts", json=body)
    assert_error(response, 400, "invalid_request_error", code="invalid_config", param=param)
    message = response.json()["error"]["message"]
    if cli is not None:
        args = [token if arg == "EXPIRED" else arg for arg in cli]
        assert message == await cli_error(stack, capsys, "accounts", "add", body["name"], *args)
    assert "hunter2" not in message and token not in message
    assert [a["name"] for a in (await ok(await admin.get("/accounts")))["data"]] == ["acct-1", "acct-2"]


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"", None),
    (json.dumps(new_account(colour="red")).encode(), "colour"),
    (json.dumps(new_account(rpm="60")).encode(), "rpm"),
    (json.dumps(new_account(models="kimi-k2")).encode(), "models"),
    (json.dumps(new_account(enabled="yes")).encode(), "enabled"),
    (json.dumps(new_account(token="t")).encode(), "token"),  # both api_key and token
    (json.dumps({"kind": "moonshot"}).encode(), "name"),
])
async def test_malformed_bodies_are_400s(stack: Stack, admin: httpx.AsyncClient, body: bytes,
                                         param: str | None) -> None:
    response = await admin.post("/accounts", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_request_error", param=param)


async def test_a_fresh_kimi_web_token_is_accepted_and_shown_masked(stack: Stack, admin: httpx.AsyncClient) -> None:
    token = mint_jwt("user-1", now=stack.clock.time(), ttl=30 * DAY)
    added = await ok(await admin.post("/accounts", json={"name": "web", "kind": "kimi-web", "token": token,
                                                         "keep_chats": True, "enabled": False}), 201)
    assert added["token_expires"] == pytest.approx(stack.clock.time() + 30 * DAY)
    assert (added["state"], added["reason"], added["options"]) == ("disabled", "disabled by operator",
                                                                    {"keep_chats": True})
    assert added["key"] == f"{token[:4]}…{token[-4:]}" and token not in json.dumps(added)
    assert (await pool_states(stack))["web"] == "disabled"


async def test_duplicates_are_409_with_the_clis_message(stack: Stack, admin: httpx.AsyncClient,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    response = await admin.post("/accounts", json=new_account(name="acct-1"))
    assert_error(response, 409, "invalid_request_error", code="already_exists", param="name")
    assert f"{response.json()['error']['message']} (database {stack.tmp_path / 'kimi-pool.db'})" == await cli_error(
        stack, capsys, "accounts", "add", "acct-1", "--kind", "kimi-ai-chat"), "the CLI also names the database"


async def test_a_body_over_one_mib_is_413_and_methods_are_checked(stack: Stack, admin: httpx.AsyncClient) -> None:
    big = json.dumps(new_account(base_url="http://h/" + "a" * (1 << 20))).encode()
    assert_error(await admin.post("/accounts", content=big), 413, "invalid_request_error", code="payload_too_large")
    wrong = await admin.put("/accounts")
    assert_error(wrong, 405, "invalid_request_error", code="method_not_allowed")
    assert wrong.headers["allow"] == "GET, HEAD, POST"


# --- client keys --------------------------------------------------------------------------------------


async def test_keys_are_shown_once_work_at_once_and_revoked_ones_are_refused_at_once(
        stack: Stack, admin: httpx.AsyncClient) -> None:
    created = await ok(await admin.post("/keys", json={"name": "batch"}), 201)
    key = created["key"]
    assert key.startswith("kp-") and created["prefix"] == key[:8] and created["revoked_at"] is None
    listed = await admin.get("/keys")
    assert [k["name"] for k in listed.json()["data"]] == ["batch"] and key not in listed.text
    client = stack.client(api_key=key)
    assert await served_by(stack, client=client) in ("acct-1", "acct-2")

    revoked = await ok(await admin.delete("/keys/batch"))
    assert revoked["revoked_at"] == stack.clock.time() and "key" not in revoked
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model=MODEL, messages=HELLO)

    assert_error(await admin.post("/keys", json={"name": "batch"}), 409, "invalid_request_error", param="name")
    assert_error(await admin.post("/keys", json={"name": "no spaces"}), 400, "invalid_request_error", param="name")
    assert_error(await admin.post("/keys", json={}), 400, "invalid_request_error", param="name")
    assert_error(await admin.post("/keys", json={"name": "k", "scope": "all"}), 400, "invalid_request_error",
                 param="scope")
    assert_error(await admin.delete("/keys/nope"), 404, "invalid_request_error", code="not_found")


# --- sessions -----------------------------------------------------------------------------------------


async def test_sessions_are_listed_and_deleted_in_the_server_too(stack: Stack, admin: httpx.AsyncClient) -> None:
    client = stack.client()
    account = (await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, extra_headers={"X-Session-Id": "conv/1"})).headers["x-kimi-pool-account"]
    key = "h:master:conv/1"
    [view] = (await ok(await admin.get("/sessions")))["data"]  # the write-behind is flushed for the read
    assert (view["key"], view["account"], view["expired"]) == (key, account, False)
    assert (await ok(await admin.get("/sessions", params={"account": "elsewhere"})))["data"] == []
    assert len((await ok(await admin.get("/sessions", params={"account": account, "limit": 1})))["data"]) == 1

    assert await ok(await admin.delete(f"/sessions/{key}")) == {"key": key, "deleted": True}
    assert stack.gateway.sessions.get(key, stack.clock.time()) is None
    assert (await ok(await admin.get("/sessions")))["data"] == []
    assert_error(await admin.delete(f"/sessions/{key}"), 404, "invalid_request_error", code="not_found")
    for params, param in (({"limit": "0"}, "limit"), ({"limit": "many"}, "limit"), ({"acount": "x"}, "acount")):
        assert_error(await admin.get("/sessions", params=params), 400, "invalid_request_error", param=param)


# --- models -------------------------------------------------------------------------------------------


async def test_aliases_reach_v1_models_at_once(stack: Stack, admin: httpx.AsyncClient,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    async def served() -> set[str]:
        return {model.id async for model in stack.client().models.list()}

    put = await admin.put("/models/team/fast", json={"moonshot": "kimi-k2-turbo-preview", "kimi-web": None})
    entry = await ok(put, 201)
    assert entry == {"model": "team/fast", "alias": {"moonshot": "kimi-k2-turbo-preview"},
                     "accounts": ["acct-1 as kimi-k2-turbo-preview", "acct-2 as kimi-k2-turbo-preview"],
                     "warning": None, "result": "created"}
    assert "team/fast" in await served()
    assert await ok(await admin.get("/models/team/fast")) == {k: v for k, v in entry.items() if k != "result"}
    assert await served_by(stack, model="team/fast") in ("acct-1", "acct-2")
    assert (await ok(await admin.put("/models/team/fast", json={"moonshot": "kimi-k2-turbo-preview"})))[
        "result"] == "unchanged"

    catalogue = await ok(await admin.get("/models"))
    assert await asyncio.to_thread(run, ["--db", stack.db_url, "models", "list", "--json"]) == 0
    assert catalogue["data"] == json.loads(capsys.readouterr().out)

    assert await ok(await admin.delete("/models/team/fast")) == {"model": "team/fast", "deleted": True}
    assert await ok(await admin.delete("/models/kimi-k2")) == {"model": "kimi-k2", "deleted": True}
    assert not {"team/fast", "kimi-k2"} & await served()
    assert_error(await admin.delete("/models/team/fast"), 404, "invalid_request_error", code="not_found")
    assert_error(await admin.get("/models/team/fast"), 404, "invalid_request_error", code="not_found")
    assert_error(await admin.put("/models/x", json={"openai": "gpt"}), 400, "invalid_request_error", param="openai")
    assert_error(await admin.put("/models/x", json={"moonshot": "bad id"}), 400, "invalid_request_error",
                 param="moonshot")
    empty = await admin.put("/models/x", json={})
    assert_error(empty, 400, "invalid_request_error")
    assert "give at least one of moonshot, kimi-web, kimi-ai-chat" in empty.json()["error"]["message"]


# --- what the pool has been doing ---------------------------------------------------------------------


async def test_events_show_a_cooldown_after_a_429_at_once(stack: Stack, admin: httpx.AsyncClient) -> None:
    assert (await ok(await admin.get("/events")))["data"] == []
    stack.emulator.script(None, [{"kind": "rate_limit", "bucket": "rpm", "wait": 7}])
    other = await served_by(stack)  # the first account tried is cooled, the request moves on
    cooled = "acct-1" if other == "acct-2" else "acct-2"
    [event] = (await ok(await admin.get("/events")))["data"]
    assert (event["account"], event["state"]) == (cooled, "cooling_down")
    assert event["until"] == stack.clock.time() + 7 and event["ts"] == stack.clock.time() and event["reason"]
    assert (await ok(await admin.get("/events", params={"account": other})))["data"] == []

    await ok(await admin.post(f"/accounts/{cooled}/enable"))  # the operator's enable is not a health event
    assert len((await ok(await admin.get("/events", params={"account": cooled, "limit": 5})))["data"]) == 1
    assert_error(await admin.get("/events", params={"limit": "1001"}), 400, "invalid_request_error", param="limit")


async def test_usage_report_by_account_and_model(stack: Stack, admin: httpx.AsyncClient) -> None:
    accounts = [await served_by(stack) for _ in range(3)]
    stack.clock.advance(1)  # the report ends now, excluded
    report = await ok(await admin.get("/usage", params={"since": "1h"}))
    assert (report["by"], report["until"] - report["since"]) == ("account", 3600)
    rows = {row["account"]: row["requests"] for row in report["rows"]}
    assert rows == {name: accounts.count(name) for name in set(accounts)}
    total = report["total"]
    assert (total["requests"], total["ok"], total["errors"]) == (3, 3, 0) and total["total_tokens"] > 0

    by_model = await ok(await admin.get("/usage", params={"by": "model"}))
    assert [(row["model"], row["requests"]) for row in by_model["rows"]] == [(MODEL, 3)]
    by_key = await ok(await admin.get("/usage", params={"by": "key", "since": "2025-01-01"}))
    assert [(row["key"], row["requests"]) for row in by_key["rows"]] == [("master", 3)]
    for params, param in (({"by": "colour"}, "by"), ({"since": "yesterday"}, "since"),
                          ({"since": "1h", "until": "2h"}, "since"), ({"step": "1h"}, "step")):
        assert_error(await admin.get("/usage", params=params), 400, "invalid_request_error", param=param)
