"""The scheduler alone: decisions per second with 10, 1,000 and 10,000 accounts.

Each decision is what a request costs the pool: ``acquire`` (walk the ring from the cursor, check
state, model, concurrency and the RPM/TPM/TPD windows, charge the cost) and ``release`` (true-up).
Two shapes: every account has room (the common case), and nine accounts in ten are cooling down
or at their limits, so the ring walk has to skip them.

    python bench/scheduler.py [--decisions 200000]
"""

from __future__ import annotations

import argparse
import time

from app.accounts_config import make_account_spec
from app.clock import ManualClock
from app.errors import RateLimited
from app.pool.account import Account
from app.pool.scheduler import Pool


def build(size: int, clock: ManualClock, busy_share: float) -> Pool:
    pool = Pool(clock)
    for i in range(size):
        spec = make_account_spec(name=f"acct-{i:05d}", kind="moonshot", secret="sk-bench-secret-value",
                                 models=["kimi-k2"], rpm=10**9, tpm=10**12, concurrency=10**6)
        pool.put(Account(spec, "sk"))
    busy = int(size * busy_share)
    for account in list(pool.accounts.values())[:busy]:
        pool.report(account, RateLimited("bench", retry_after=3600))
    return pool


def measure(size: int, decisions: int, busy_share: float) -> float:
    clock = ManualClock()
    pool = build(size, clock, busy_share)
    start = time.perf_counter()
    for i in range(decisions):
        lease = pool.acquire("kimi-k2", 1200)
        assert lease is not None
        lease.release(300)
        if i % 1000 == 0:
            clock.advance(0.01)
    return (time.perf_counter() - start) / decisions * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=200_000)
    args = parser.parse_args()
    print("| accounts | all free: µs per decision | 90% cooling: µs per decision |")
    print("|---|---|---|")
    for size in (10, 1_000, 10_000):
        free = measure(size, args.decisions, 0.0)
        busy = measure(size, args.decisions // 10, 0.9)
        print(f"| {size:,} | {free:.2f} ({1e6 / free:,.0f}/s) | {busy:.2f} ({1e6 / busy:,.0f}/s) |")


if __name__ == "__main__":
    main()
