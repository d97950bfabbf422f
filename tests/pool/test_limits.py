"""Pacing windows: sliding minutes, the daily counter, true-up, and limits learned from the upstream."""

from __future__ import annotations

from app.accounts_config import make_account_spec
from app.pool.limits import DAY, RECOVER_AFTER, RESOLUTION, DayCounter, Limits, Window, batch_limit, next_day

T0 = 1_760_000_000.0  # 2025-10-09 08:53:20 UTC, 16:53:20 in UTC+8


def limits(**kw: object) -> Limits:
    return Limits(make_account_spec(name="a", kind="moonshot", secret="sk-secret-value-123", **kw))  # type: ignore[arg-type]


def test_a_window_forgets_what_is_older_than_its_span() -> None:
    window = Window(60)
    window.add(T0, 5)
    window.add(T0 + 0.1, 1)  # same bucket
    window.add(T0 + 30, 7)
    assert window.used(T0 + 60) == 13, "a bucket stays until its last instant is a minute old"
    assert window.used(T0 + 60 + RESOLUTION) == 7
    assert window.used(T0 + 91) == 0
    assert len(window._entries) == 0


def test_free_at_is_when_enough_of_the_window_has_rolled_off() -> None:
    window = Window(60)
    window.add(T0, 5)
    window.add(T0 + 10, 5)
    assert window.free_at(T0 + 20, 0, 10) == T0 + 20
    assert window.free_at(T0 + 20, 3, 10) == T0 + 60 + RESOLUTION
    assert window.free_at(T0 + 20, 8, 10) == T0 + 70 + RESOLUTION
    assert window.free_at(T0 + 20, 50, 10) == T0 + 70 + RESOLUTION, "more than the limit waits for an empty window"


def test_a_window_holds_one_entry_per_bucket_whatever_the_rate() -> None:
    window = Window(60)
    for i in range(10_000):
        window.add(T0 + i * 0.006, 1)  # 10,000 requests in a minute
    assert window.used(T0 + 60) == 10_000 and len(window._entries) <= 60 / RESOLUTION + 1


def test_rpm_and_concurrency_limit_requests() -> None:
    lim = limits(rpm=2, concurrency=1)
    assert lim.has_room(0) and not lim.has_room(1)
    lim.charge(T0, 10)
    lim.charge(T0 + 1, 10)
    assert not lim.fits(T0 + 2, 10)
    assert lim.free_at(T0 + 2, 10) == T0 + 60 + RESOLUTION
    assert lim.fits(T0 + 60 + RESOLUTION, 10)


def test_tpm_charges_up_front_and_trues_up_with_real_usage() -> None:
    lim = limits(tpm=1000)
    charge = lim.charge(T0, 900)  # prompt estimate + max_tokens
    assert not lim.fits(T0, 200)
    lim.settle(charge, 150, T0 + 1)  # the answer was short
    assert lim.tpm.used(T0 + 1) == 150 and lim.fits(T0 + 1, 800)


def test_the_day_rolls_over_at_midnight_china_time() -> None:
    counter = DayCounter()
    counter.add(T0, 900)
    midnight = next_day(T0)
    assert (midnight + 8 * 3600) % DAY == 0 and midnight - T0 < DAY
    assert counter.free_at(T0, 200, 1000) == midnight
    assert counter.current(midnight) == 0


def test_a_rate_limit_lowers_the_window_to_what_the_upstream_named_then_it_recovers() -> None:
    lim = limits(rpm=10)
    lim.learn("rpm", 4, in_flight=1, now=T0)
    assert lim.effective["rpm"] == 4
    lim.learn("rpm", 6, in_flight=1, now=T0)
    assert lim.effective["rpm"] == 4, "a higher figure never raises a learned limit"
    lim.fits(T0 + RECOVER_AFTER, 0)
    assert lim.effective["rpm"] == 5
    lim.fits(T0 + 10 * RECOVER_AFTER, 0)
    assert lim.effective["rpm"] == 10 and not lim._learned_at, "back to the configured limit"


def test_without_a_stated_limit_the_observed_use_is_what_was_allowed() -> None:
    lim = limits()
    for i in range(5):
        lim.charge(T0 + i, 10)
    lim.learn("rpm", None, in_flight=1, now=T0 + 5)  # the fifth was refused
    assert lim.effective["rpm"] == 4
    lim.learn("concurrency", None, in_flight=3, now=T0 + 5)
    assert lim.effective["concurrency"] == 2


def test_learned_limits_survive_a_configuration_reload() -> None:
    old = limits(rpm=10)
    old.charge(T0, 10)
    old.learn("rpm", 3, in_flight=1, now=T0)
    new = limits(rpm=20)
    new.carry_over(old)
    assert new.effective["rpm"] == 3 and new.rpm.used(T0) == 1


def test_batch_work_gets_its_share_of_each_limit_rounded_down_but_never_nothing() -> None:
    assert [batch_limit(n, 0.8) for n in (10, 5, 4, 1, 100)] == [8, 4, 3, 1, 80]
    assert batch_limit(100, 0.71) == 71, "no float error takes one off"
    lim = limits(rpm=10, tpm=1000, concurrency=5)
    assert lim.has_room_batch(3, 0.8) and not lim.has_room_batch(4, 0.8) and lim.has_room(4)
    for i in range(8):
        assert lim.fits_batch(T0, 10, 0.8)
        lim.charge(T0 + i * 0.01, 10)
    assert not lim.fits_batch(T0, 10, 0.8) and lim.fits(T0, 10), "the last 2 of the minute are for interactive work"
    assert lim.free_at(T0, 10, keep=0.8) == T0 + 60 + RESOLUTION and lim.free_at(T0, 10) == T0


def test_the_batch_share_of_tokens_counts_everything_charged() -> None:
    lim = limits(tpm=1000)
    lim.charge(T0, 700)  # interactive requests
    assert lim.fits(T0, 200) and not lim.fits_batch(T0, 200, 0.8)
    assert lim.fits_batch(T0, 100, 0.8)


def test_what_was_learned_is_stored_and_taken_up_again_as_it_stands() -> None:
    old = limits(rpm=60)
    old.learn("rpm", 3, in_flight=1, now=T0)
    stored = old.learned()
    assert stored == {"rpm": {"limit": 3, "at": T0}}
    taken_up = Limits(make_account_spec(name="a", kind="moonshot", secret="sk-secret-value-123", rpm=60), stored)
    assert taken_up.current(T0) == old.current(T0)
    assert taken_up.current(T0 + 2 * RECOVER_AFTER)["rpm"] == old.current(T0 + 2 * RECOVER_AFTER)["rpm"] == 5
    assert Limits(make_account_spec(name="a", kind="moonshot", secret="sk-secret-value-123", rpm=2),
                  stored).current(T0)["rpm"] == 2, "a configured limit below what was learned wins"


def test_an_operator_reset_forgets_what_was_learned_but_keeps_the_windows() -> None:
    old = limits(rpm=60)
    old.charge(T0, 10)
    old.learn("rpm", 3, in_flight=1, now=T0)
    new = limits(rpm=60)
    new.carry_over(old, learned=False)
    assert new.current(T0) == {"concurrency": None, "rpm": 60, "tpm": None, "tpd": None} and new.learned() == {}
    assert new.rpm.used(T0) == 1, "what was sent still counts"


def test_without_a_configured_limit_a_learned_one_is_forgotten_in_the_end() -> None:
    lim = limits()
    lim.learn("rpm", 3, in_flight=1, now=T0)
    assert lim.current(T0 + 100 * RECOVER_AFTER)["rpm"] == 103_249, "a tenth more every 5 minutes"
    assert lim.current(T0 + 60 * DAY)["rpm"] is None and lim.learned() == {}, "not a number too large to hold"
