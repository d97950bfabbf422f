"""The admission queue on its own: waiting for capacity, honest refusals, fairness between keys."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from app.accounts_config import make_account_spec
from app.clock import ManualClock
from app.errors import PoolBusy, PoolUnavailable, RateLimited
from app.pool.account import Account
from app.pool.admission import Admission
from app.pool.limits import RESOLUTION
from app.pool.scheduler import Lease, Pool
from tests.conftest import create_client_key, run_stack

T0 = 1_760_000_000.0
MODEL = "kimi-k2-0905-preview"
HELLO: Any = [{"role": "user", "content": "hello"}]


def make(*specs: dict[str, object], max_queue: int = 100) -> tuple[ManualClock, Pool, Admission]:
    clock = ManualClock(T0)
    pool = Pool(clock)
    for i, extra in enumerate(specs):
        spec = make_account_spec(name=f"a{i}", kind="moonshot", secret="sk-secret-value-123", models=["m"],
                                 **extra)  # type: ignore[arg-type]
        pool.put(Account(spec, "sk"))
    return clock, pool, Admission(pool, clock, max_queue=max_queue)


async def test_a_request_waits_for_a_slot_and_gets_it_when_one_is_released() -> None:
    _clock, _pool, admission = make({"concurrency": 1})
    first = await admission.acquire("m", 1, client="k", deadline=T0 + 30)
    second = asyncio.create_task(admission.acquire("m", 1, client="k", deadline=T0 + 30))
    await admission.wait_depth(1)
    first.release()
    lease = await second
    assert lease.account.name == "a0" and admission.depth == 0


async def test_a_full_window_wakes_the_queue_when_it_rolls_over_on_the_clock() -> None:
    clock, _pool, admission = make({"rpm": 1})
    (await admission.acquire("m", 1, client="k", deadline=T0 + 90)).release()
    waiting = asyncio.create_task(admission.acquire("m", 1, client="k", deadline=T0 + 90))
    await admission.wait_depth(1)
    clock.advance(60)
    await asyncio.sleep(0)
    assert not waiting.done()
    clock.advance(RESOLUTION)  # the window's last bucket is a minute old
    assert (await waiting).account.name == "a0"


async def test_a_request_that_cannot_be_served_before_its_deadline_is_refused_at_once() -> None:
    _clock, _pool, admission = make({"rpm": 1})
    await admission.acquire("m", 1, client="k", deadline=T0 + 1)
    with pytest.raises(PoolBusy) as refused:
        await admission.wait_or_refuse("m", 1, client="k", deadline=T0 + 1)
    assert refused.value.retry_after == 60 + RESOLUTION and refused.value.headers() == {"Retry-After": "60"}
    assert admission.waited == 0, "it never queued"


async def test_past_its_deadline_a_waiting_request_gets_an_honest_retry_after() -> None:
    clock, _pool, admission = make({"concurrency": 1, "rpm": 2})
    await admission.acquire("m", 1, client="k", deadline=T0 + 5)  # holds the only slot
    clock.advance(10)
    waiting = asyncio.create_task(admission.wait_or_refuse("m", 1, client="k", deadline=T0 + 15))
    await admission.wait_depth(1)
    clock.advance(5)
    with pytest.raises(PoolBusy) as refused:
        await waiting
    assert refused.value.headers()["Retry-After"] == "1", "only the slot is missing: retry soon"
    assert admission.depth == 0


async def test_nothing_to_serve_the_model_is_503_and_a_full_queue_is_429_at_once() -> None:
    clock, pool, admission = make({"concurrency": 1}, max_queue=1)
    pool.report(pool.accounts["a0"], RateLimited("x", retry_after=5))
    waiting = asyncio.create_task(admission.acquire("m", 1, client="k", deadline=T0 + 30))
    await admission.wait_depth(1)
    with pytest.raises(PoolBusy, match="queue is full"):
        await admission.acquire("m", 1, client="k", deadline=T0 + 30)
    clock.advance(5)
    (await waiting).release()
    pool.set_operator_state(pool.accounts["a0"], False, "off")
    with pytest.raises(PoolUnavailable):
        await admission.acquire("m", 1, client="k", deadline=T0 + 30)


async def test_waiting_client_keys_are_served_in_turn() -> None:
    _clock, _pool, admission = make({"concurrency": 1})
    held = await admission.acquire("m", 1, client="batch", deadline=T0 + 30)
    served: list[str] = []

    async def one(client: str) -> None:
        lease = await admission.acquire("m", 1, client=client, deadline=T0 + 30)
        served.append(client)
        leases.put_nowait(lease)

    leases: asyncio.Queue[Lease] = asyncio.Queue()
    tasks = [asyncio.create_task(one("batch")) for _ in range(6)]
    await admission.wait_depth(6)
    tasks += [asyncio.create_task(one("chat")) for _ in range(3)]
    await admission.wait_depth(9)
    held.release()
    for _ in range(9):
        (await leases.get()).release()
    await asyncio.gather(*tasks)
    assert served[:6] == ["batch", "chat", "batch", "chat", "batch", "chat"]
    assert served.count("chat") == 3


async def test_a_request_waits_for_its_sessions_account_while_it_could_serve_in_time() -> None:
    _clock, pool, admission = make({"concurrency": 1}, {"concurrency": 1})
    busy = await admission.acquire("m", 1, client="k", deadline=T0 + 30, prefer="a0")
    assert busy.account.name == "a0"
    pinned = asyncio.create_task(admission.acquire("m", 1, client="k", deadline=T0 + 30, prefer="a0"))
    await admission.wait_depth(1)
    busy.release()
    assert (await pinned).account.name == "a0", "waited for a0 although a1 was free"
    pool.report(pool.accounts["a0"], RateLimited("x", retry_after=120))
    moved = await admission.acquire("m", 1, client="k", deadline=T0 + 30, prefer="a0")
    assert moved.account.name == "a1", "a0 cools past the deadline: the session moves"


async def test_waiting_interactive_requests_are_served_before_waiting_batch_requests() -> None:
    _clock, _pool, admission = make({"concurrency": 1})
    held = await admission.acquire("m", 1, client="k", deadline=T0 + 30)
    served: list[str] = []
    leases: asyncio.Queue[Lease] = asyncio.Queue()

    async def one(name: str, batch: bool) -> None:
        leases.put_nowait(await admission.acquire("m", 1, client="k", deadline=T0 + 30, batch=batch))
        served.append(name)

    tasks = [asyncio.create_task(one(f"batch-{i}", True)) for i in range(3)]
    await admission.wait_depth(3)
    tasks += [asyncio.create_task(one(f"chat-{i}", False)) for i in range(2)]
    await admission.wait_depth(5)
    assert admission.batch_depth == 3 and admission.depth_by_client() == {"k": 5}
    held.release()
    for _ in range(5):
        (await leases.get()).release()
    await asyncio.gather(*tasks)
    assert served == ["chat-0", "chat-1", "batch-0", "batch-1", "batch-2"]


async def test_an_interactive_request_does_not_queue_behind_batch_waiters_nor_find_the_queue_full() -> None:
    clock = ManualClock(T0)
    pool = Pool(clock, interactive_share=0.5)
    pool.put(Account(make_account_spec(name="a0", kind="moonshot", secret="sk-secret-value-123", models=["m"],
                                       concurrency=2), "sk"))
    admission = Admission(pool, clock, max_queue=2)
    first = await admission.acquire("m", 1, client="batch", deadline=T0 + 30, batch=True)
    waiting = [asyncio.create_task(admission.acquire("m", 1, client="batch", deadline=T0 + 30, batch=True))
               for _ in range(2)]
    await admission.wait_depth(2)
    with pytest.raises(PoolBusy, match="queue is full"):
        await admission.acquire("m", 1, client="batch", deadline=T0 + 30, batch=True)
    chat = await admission.acquire("m", 1, client="chat", deadline=T0 + 30)
    assert chat.account.name == "a0", "the slot batch work leaves free, at once"
    for lease in (first, chat):
        lease.release()
    for task in waiting:
        (await task).release()


# --- through HTTP: one key's share of the queue ------------------------------------------------------


async def test_one_client_key_cannot_fill_the_queue_for_the_others(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path, keys=["sk-emu-0001"], account_extra={"concurrency": 1},
                         settings={"max_queue_per_key": 2}) as stack:
        team_a = stack.client(await create_client_key(stack, "team-a", capsys))
        team_b = stack.client(await create_client_key(stack, "team-b", capsys))
        stack.emulator.script(None, [{"kind": "hold_after", "chunks": 0}])

        def ask(client: openai.AsyncOpenAI) -> asyncio.Future[Any]:
            return asyncio.ensure_future(client.chat.completions.create(model=MODEL, messages=HELLO))

        busy = ask(team_a)  # holds the account's one slot
        await stack.emulator.wait_for(lambda e: e.held == 1)
        waiting = [ask(team_a), ask(team_a)]
        await stack.gateway.admission.wait_depth(2)
        with pytest.raises(openai.RateLimitError) as refused:
            await team_a.chat.completions.create(model=MODEL, messages=HELLO)
        assert refused.value.body["code"] == "key_queue_share_exceeded"  # type: ignore[index]
        assert refused.value.response.headers["retry-after"] == "1"
        assert "its share of the queue" in refused.value.message

        waiting.append(ask(team_b))  # another key still gets a place in the queue
        await stack.gateway.admission.wait_depth(3)
        stack.emulator.release()
        for answer in await asyncio.gather(busy, *waiting):
            assert answer.choices[0].message.content
