"""Sessions: key derivation, the table's TTL, throttled persistence and migration between accounts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from app.clock import ManualClock
from app.pool.sessions import DEFAULT_TTL, MAX_KEY_LENGTH, Binding, SessionTable, session_key
from tests.conftest import MASTER_KEY, create_client_key, run_stack

HOUR = 3600.0
MODEL = "kimi-k2-0905-preview"
HELLO: Any = [{"role": "user", "content": "hello"}]
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers."},
    {"role": "assistant", "content": "Nile, Amazon, Yangtze."},
    {"role": "user", "content": "And three lakes?"},
]


def key(messages: list[dict[str, Any]] = CHAT, *, header: str | None = None, user: str | None = None,
        client: str | None = "team-a") -> str:
    return session_key(session_header=header, user=user, client=client, messages=messages)


class Recorder:
    """An ``on_change`` listener that keeps what it was told, as it was when told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float]] = []

    def __call__(self, binding: Binding) -> None:
        self.seen.append((binding.key, binding.account, binding.expires_at))


def table(ttl: float = DEFAULT_TTL, persist_every: float = 60.0) -> tuple[SessionTable, Recorder]:
    sessions = SessionTable(ttl=ttl, persist_every=persist_every)
    recorder = Recorder()
    sessions.on_change(recorder)
    return sessions, recorder


# --- keys -----------------------------------------------------------------------------------------


def test_header_wins_over_user_which_wins_over_the_hash() -> None:
    assert key(header="conv-1", user="alice") == "h:team-a:conv-1"
    assert key(user="alice") == "u:team-a:alice"
    hashed = key()
    assert hashed.startswith("c:") and len(hashed) == 2 + 32
    assert key(header="  ", user="") == hashed  # blank values count as absent


def test_the_hash_is_the_documented_digest() -> None:
    canonical = json.dumps({"client": "team-a", "system": ["You are terse."], "user": "Name three rivers."},
                           ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    assert key() == "c:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def test_later_turns_keep_the_key_and_other_starts_do_not() -> None:
    first_turn = CHAT[:2]
    assert key(first_turn) == key(CHAT) == key([*CHAT, {"role": "assistant", "content": "Baikal…"}])
    assert key([CHAT[0], {"role": "user", "content": "Name three seas."}]) != key(first_turn)
    assert key([{"role": "system", "content": "You are verbose."}, CHAT[1]]) != key(first_turn)
    assert key(CHAT[1:]) != key(first_turn)  # no system prompt is a different start
    assert key(first_turn, client="team-b") != key(first_turn)
    assert key(first_turn, client=None) != key(first_turn)


def test_part_arrays_count_only_their_text() -> None:
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "You are terse.", "cache_control": {"x": 1}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Name three rivers."},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]},
    ]
    assert key(parts) == key(CHAT)  # developer = system; string and single text part agree
    other_image = json.loads(json.dumps(parts))
    other_image[1]["content"][1]["image_url"]["url"] = "https://example.test/cat.png"
    assert key(other_image) == key(parts)
    two_texts = [{"role": "user", "content": ["Name three", {"text": "rivers."}]}]
    assert key(two_texts) == key([{"role": "user", "content": "Name three\nrivers."}])


def test_only_system_prompts_before_the_first_user_message_count() -> None:
    injected = [*CHAT, {"role": "system", "content": "Summary of the chat so far: rivers."}]
    assert key(injected) == key(CHAT)


def test_long_ids_are_shortened_to_fit_the_column_and_stay_distinct() -> None:
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    assert len(key(header=long_a)) <= MAX_KEY_LENGTH and key(header=long_a).startswith("h:team-a:#")
    assert key(header=long_a) != key(header=long_b)
    assert len(key(user=long_a)) <= MAX_KEY_LENGTH and key(user=long_a) != key(user=long_a, client="x")


def test_odd_messages_still_make_a_key() -> None:
    assert key([]).startswith("c:")
    assert key([{"role": "system", "content": None}, "junk", {"role": "user"}]).startswith("c:")  # type: ignore[list-item]


# --- the table ------------------------------------------------------------------------------------


def test_bind_then_get_until_the_ttl_runs_out() -> None:
    clock = ManualClock()
    sessions, recorder = table(ttl=HOUR)
    binding = sessions.bind("k", "acct-1", clock.time())
    assert (binding.key, binding.account, binding.chat_id, binding.last_used, binding.expires_at) == (
        "k", "acct-1", None, clock.time(), clock.time() + HOUR)
    assert recorder.seen == [("k", "acct-1", clock.time() + HOUR)]
    clock.advance(HOUR - 1)
    assert sessions.get("k", clock.time()) is binding
    clock.advance(1)
    assert sessions.get("k", clock.time()) is None
    assert len(sessions) == 0 and sessions.for_account("acct-1") == []
    assert sessions.get("nope", clock.time()) is None


def test_touch_refreshes_the_ttl_but_is_announced_at_most_once_a_minute() -> None:
    clock = ManualClock()
    sessions, recorder = table(ttl=HOUR, persist_every=60)
    binding = sessions.bind("k", "acct-1", clock.time())
    for _ in range(10):  # ten requests in 50 s: no writes
        clock.advance(5)
        assert sessions.touch(binding, clock.time())
    assert len(recorder.seen) == 1
    assert binding.last_used == clock.time() and binding.expires_at == clock.time() + HOUR
    clock.advance(10)  # 60 s since the bind was announced
    sessions.touch(binding, clock.time())
    assert recorder.seen[-1] == ("k", "acct-1", clock.time() + HOUR) and len(recorder.seen) == 2
    clock.advance(59)
    sessions.touch(binding, clock.time())
    assert len(recorder.seen) == 2
    clock.advance(HOUR - 1)  # kept alive by the touches, not by the bind
    assert sessions.get("k", clock.time()) is binding


def test_rebinding_migrates_and_forgets_the_upstream_chat() -> None:
    clock = ManualClock()
    sessions, recorder = table()
    binding = sessions.bind("k", "web-1", clock.time())
    assert sessions.set_upstream(binding, "chat-9", "msg-3", clock.time())
    assert (binding.chat_id, binding.parent_id) == ("chat-9", "msg-3")
    clock.advance(1)
    assert sessions.bind("k", "web-1", clock.time()) is binding  # same account: the chat is kept
    assert binding.chat_id == "chat-9"
    moved = sessions.bind("k", "web-2", clock.time())
    assert moved is binding and (moved.account, moved.chat_id, moved.parent_id) == ("web-2", None, None)
    assert [b.key for b in sessions.for_account("web-2")] == ["k"] and sessions.for_account("web-1") == []
    assert [account for _, account, _ in recorder.seen] == ["web-1", "web-1", "web-1", "web-2"]


def test_drop_is_announced_as_expired_and_stale_bindings_are_left_alone() -> None:
    clock = ManualClock()
    sessions, recorder = table()
    binding = sessions.bind("k", "acct-1", clock.time())
    assert sessions.drop("k") is binding
    assert recorder.seen[-1] == ("k", "acct-1", 0.0)
    assert sessions.drop("k") is None and len(recorder.seen) == 2
    assert not sessions.touch(binding, clock.time())  # a request that still held it
    assert not sessions.set_upstream(binding, "chat", "msg", clock.time())
    assert len(recorder.seen) == 2 and sessions.get("k", clock.time()) is None
    fresh = sessions.bind("k", "acct-2", clock.time())
    assert fresh is not binding and not sessions.touch(binding, clock.time())


def test_load_takes_stored_bindings_without_announcing_them() -> None:
    clock = ManualClock()
    now = clock.time()
    sessions, recorder = table(persist_every=60)
    stored = [Binding(key="a", account="acct-1", chat_id="c", parent_id="p", last_used=now - 30,
                      expires_at=now + HOUR),
              Binding(key="b", account="acct-2", last_used=now - 10, expires_at=now + HOUR)]
    newer = sessions.bind("b", "acct-3", now)
    sessions.load(stored)
    assert recorder.seen == [("b", "acct-3", now + DEFAULT_TTL)]  # only the bind
    assert sessions.get("a", now) is stored[0] and sessions.get("b", now) is newer
    sessions.touch(stored[0], now)  # stored 30 s ago: not written again yet
    assert len(recorder.seen) == 1
    clock.advance(30)
    sessions.touch(stored[0], clock.time())
    assert recorder.seen[-1][0] == "a"


def test_purge_expired_and_for_account() -> None:
    clock = ManualClock()
    sessions, recorder = table(ttl=HOUR)
    for n in range(4):
        sessions.bind(f"k{n}", "acct-1" if n % 2 else "acct-2", clock.time())
        clock.advance(HOUR / 4)
    assert sorted(b.key for b in sessions.for_account("acct-1")) == ["k1", "k3"]
    announced = len(recorder.seen)
    assert sessions.purge_expired(clock.time()) == 1  # k0, bound an hour ago
    assert sessions.purge_expired(clock.time()) == 0
    assert len(sessions) == 3 and sorted(b.key for b in sessions.for_account("acct-2")) == ["k2"]
    assert len(recorder.seen) == announced
    clock.advance(HOUR)
    assert sessions.purge_expired(clock.time()) == 3 and len(sessions) == 0


def test_a_client_key_holds_at_most_its_cap_and_loses_its_least_recently_used() -> None:
    clock = ManualClock()
    sessions = SessionTable(max_per_client=2)
    recorder = Recorder()
    sessions.on_change(recorder)
    a1 = sessions.bind("a1", "acct-1", clock.time(), "team-a")
    sessions.bind("a2", "acct-2", clock.time(), "team-a")
    sessions.bind("b1", "acct-1", clock.time(), "team-b")
    clock.advance(1)
    assert sessions.touch(a1, clock.time())  # a1 is used again: a2 is now the least recently used
    sessions.bind("a3", "acct-3", clock.time(), "team-a")
    assert sessions.get("a2", clock.time()) is None, "dropped for the new one"
    assert ("a2", "acct-2", 0.0) in recorder.seen, "announced expired, so the stored copy goes too"
    assert {k for k in ("a1", "a3", "b1") if sessions.get(k, clock.time())} == {"a1", "a3", "b1"}
    assert (sessions.count_for("team-a"), sessions.count_for("team-b")) == (2, 1), "another key is untouched"
    assert sessions.bind("a1", "acct-2", clock.time(), "team-a") is a1, "a migration is no new binding"
    assert sessions.count_for("team-a") == 2 and sessions.get("a3", clock.time()) is not None

    stored = [Binding(key=f"c{n}", account="acct-1", last_used=clock.time() - 10 + n,
                      expires_at=clock.time() + HOUR, client="team-c") for n in range(3)]
    sessions.load(stored)  # least recently used first, as the store reads them
    assert [k for k in ("c0", "c1", "c2") if sessions.get(k, clock.time())] == ["c1", "c2"]


@pytest.mark.parametrize(("ttl", "persist_every"), [(0, 60), (-1, 60), (HOUR, -1)])
def test_bad_settings_are_refused(ttl: float, persist_every: float) -> None:
    with pytest.raises(ValueError):
        SessionTable(ttl=ttl, persist_every=persist_every)


# --- through HTTP: a key's bindings are capped ------------------------------------------------------


async def test_a_key_beyond_its_sessions_cap_loses_the_affinity_of_its_oldest_conversation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, settings={"max_sessions_per_key": 2}) as stack:
        key_a = await create_client_key(stack, "team-a", capsys)
        key_b = await create_client_key(stack, "team-b", capsys)

        async def turn(api_key: str, session: str) -> str:
            client = stack.client(api_key, default_headers={"X-Session-Id": session})
            raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
            return raw.headers["x-kimi-pool-account"]

        first = [await turn(key_a, s) for s in ("s1", "s2", "s3")] + [await turn(key_b, "t1")]
        assert first == ["acct-1", "acct-2", "acct-3", "acct-1"], "round robin places each new conversation"
        assert await turn(key_a, "s2") == "acct-2" and await turn(key_b, "t1") == "acct-1", "bound ones stay"
        assert await turn(key_a, "s1") == "acct-2", "s1 was team-a's least recently used: placed afresh"

        async with stack.http() as http:
            listed = (await http.get("/admin/sessions", headers=AUTH)).json()["data"]
        live = {row["key"] for row in listed if not row["expired"]}
        assert live == {"h:team-a:s1", "h:team-a:s2", "h:team-b:t1"}, "s3 gave way when s1 came back"
