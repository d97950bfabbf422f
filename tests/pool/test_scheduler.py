"""The pool's choices: round robin, skipping what cannot serve, weights, and state after failures."""

from __future__ import annotations

from collections import Counter

import pytest

from app.accounts_config import make_account_spec
from app.clock import ManualClock
from app.errors import AuthDead, QuotaExhausted, RateLimited, Transient, UpstreamOverloaded
from app.pool.account import Account, IllegalTransition, State
from app.pool.scheduler import Pool


def account(name: str, **kw: object) -> Account:
    kw.setdefault("models", ["m1"])
    return Account(make_account_spec(name=name, kind="moonshot", secret="sk-test-secret-value", **kw), "sk")  # type: ignore[arg-type]


def pool_of(*accounts: Account, clock: ManualClock | None = None) -> Pool:
    pool = Pool(clock or ManualClock())
    for a in accounts:
        pool.put(a)
    return pool


def take(pool: Pool, model: str = "m1") -> str | None:
    lease = pool.acquire(model)
    if lease is None:
        return None
    lease.release()
    return lease.account.name


def test_round_robin_spreads_requests_evenly() -> None:
    pool = pool_of(account("a"), account("b"), account("c"))
    assert [take(pool) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_accounts_that_do_not_serve_the_model_are_skipped() -> None:
    pool = pool_of(account("a", models=["m1"]), account("b", models=["m2"]))
    assert {take(pool, "m2") for _ in range(4)} == {"b"}
    assert pool.acquire("m3") is None


def test_weights_scale_each_accounts_share() -> None:
    pool = pool_of(account("heavy", weight=3), account("light", weight=1))
    counts = Counter(take(pool) for _ in range(400))
    assert counts["heavy"] == 300 and counts["light"] == 100


def test_concurrency_limit_is_never_exceeded() -> None:
    pool = pool_of(account("a", concurrency=2))
    first, second = pool.acquire("m1"), pool.acquire("m1")
    assert first and second and pool.acquire("m1") is None
    first.release()
    first.release()  # releasing twice gives back one slot only
    assert pool.accounts["a"].in_flight == 1


def test_rate_limit_cools_the_account_until_the_stated_wait_passes() -> None:
    clock = ManualClock()
    pool = pool_of(account("a"), account("b"), clock=clock)
    pool.report(pool.accounts["a"], RateLimited("slow down", retry_after=20))
    assert pool.accounts["a"].state is State.COOLING_DOWN
    assert {take(pool) for _ in range(4)} == {"b"}
    clock.advance(20)
    assert {take(pool) for _ in range(4)} == {"a", "b"}


def test_repeated_rate_limits_escalate_the_cooldown() -> None:
    clock = ManualClock()
    pool = pool_of(account("a"), clock=clock)
    a = pool.accounts["a"]
    pool.report(a, RateLimited("x", retry_after=2))
    first = a.until - clock.time()
    clock.advance(first)
    assert take(pool) == "a"
    pool.report(a, RateLimited("x", retry_after=2))
    assert a.until - clock.time() == 2 * first


def test_dead_and_exhausted_accounts_stay_out_and_next_free_time_is_honest() -> None:
    clock = ManualClock()
    pool = pool_of(account("a"), account("b"), account("c"), clock=clock)
    pool.report(pool.accounts["a"], AuthDead("bad key"))
    pool.report(pool.accounts["b"], QuotaExhausted("no credit"))
    pool.report(pool.accounts["c"], QuotaExhausted("tpd", until=clock.time() + 100))
    assert pool.acquire("m1") is None
    assert pool.next_free_in("m1") == 100
    pool.report(pool.accounts["c"], AuthDead("bad key"))
    assert pool.next_free_in("m1") is None


def test_overload_and_transient_errors_do_not_blame_the_account() -> None:
    pool = pool_of(account("a"))
    pool.report(pool.accounts["a"], UpstreamOverloaded("busy"))
    pool.report(pool.accounts["a"], Transient("reset"))
    assert pool.accounts["a"].state is State.ACTIVE


def test_disable_and_enable_through_operator_state() -> None:
    pool = pool_of(account("a"))
    a = pool.accounts["a"]
    pool.set_operator_state(a, False, "maintenance")
    assert a.state is State.DISABLED and pool.acquire("m1") is None and "m1" not in pool.models()
    pool.set_operator_state(a, True, None)
    assert take(pool) == "a"


def test_illegal_transitions_raise() -> None:
    a = account("a")
    a.disable("x")
    with pytest.raises(IllegalTransition):
        a.cool_down(10, "x")
    a.enable()
    a.kill("bad key")
    with pytest.raises(IllegalTransition):
        a.exhaust(None, "x")


def test_state_changes_are_announced_to_listeners() -> None:
    clock = ManualClock()
    pool = pool_of(account("a"), clock=clock)
    seen: list[tuple[str, str]] = []
    pool.on_state_change(lambda acc: seen.append((acc.name, acc.state)))
    pool.report(pool.accounts["a"], RateLimited("x", retry_after=5))
    clock.advance(5)
    take(pool)
    assert seen == [("a", "cooling_down"), ("a", "active")]


def test_replacing_an_account_keeps_its_in_flight_count() -> None:
    pool = pool_of(account("a", concurrency=1))
    lease = pool.acquire("m1")
    assert lease is not None
    pool.put(account("a", concurrency=1, rpm=10))
    assert pool.acquire("m1") is None
    lease.release()  # the lease holds the replaced object; the live one gets its slot back
    assert pool.accounts["a"].in_flight == 0
    assert take(pool) == "a"


def test_batch_requests_take_only_the_batch_share_of_each_account() -> None:
    clock = ManualClock()
    pool = Pool(clock, interactive_share=0.2)
    for a in (account("a", concurrency=5), account("b", concurrency=1)):
        pool.put(a)
    batch = [pool.acquire("m1", batch=True) for _ in range(6)]
    assert Counter(lease.account.name for lease in batch if lease is not None) == {"a": 4, "b": 1}
    assert batch[-1] is None, "a's fifth slot is kept for interactive requests; b is too small to split"
    chat = pool.acquire("m1")
    assert chat is not None and chat.account.name == "a"
    assert pool.next_free_time("m1", batch=True) == clock.time(), "only concurrency holds batch work back"


def test_the_batch_share_is_a_fraction_below_one() -> None:
    with pytest.raises(ValueError):
        Pool(ManualClock(), interactive_share=1.0)
