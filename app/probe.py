"""Probing accounts: one free upstream request each, and what it says written back to the database.

``probe_accounts`` asks each account's adapter (``Upstream.probe``) whether the credential works
and the account can take requests, all accounts at once, one request each. The answer becomes the
account's runtime state: a working account returns to ``active`` (however it was cooling, dead or
out of credit), a rejected key becomes ``auth_dead``, an empty balance ``quota_exhausted``, a 429
``cooling_down``. A failure that says nothing about the account (5xx, network, overload) leaves the
state alone and is only reported. A working account's upstream is also asked which models it serves
(``app.discovery``), and the answer stored with the verdict. Writes bump ``config_rev`` and ``state_rev``: a
running server reloads the account (at once when the CLI tells it, ``app.notify``; else within one sync
interval) and never overwrites the verdict with an older state of its own (``app.store.states``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Literal

from app.accounts_config import AccountSpec, resolve_secret
from app.clock import Clock
from app.discovery import change, discover
from app.errors import AuthDead, ConfigError, QuotaExhausted, RateLimited, UpstreamError
from app.pool.account import Account
from app.store.db import Database
from app.store.repository import AccountRepository, HealthRepository
from app.upstreams.registry import Registry

Outcome = Literal["ok", "failed"]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    name: str
    kind: str
    before: str
    """The runtime state before the probe (``active``, ``cooling_down``, ``auth_dead``, …)."""
    after: str
    """The runtime state after it; an operator-disabled account stays disabled whatever this says."""
    detail: str
    outcome: Outcome = "ok"
    """``ok``: the account works; ``failed``: it does not, or the probe could not tell."""
    models: list[str] | None = None
    """The models its upstream says it serves (asked once it works); None: not asked, or the upstream does not
    say."""


@dataclass(frozen=True, slots=True)
class _Target:
    """What a probe needs of an account row, read in one short transaction."""

    spec: AccountSpec
    state: str
    enabled: bool
    disabled_reason: str | None
    discovered: list[str] | None


@dataclass(frozen=True, slots=True)
class _Verdict:
    result: ProbeResult
    until: float | None = None
    reason: str | None = None
    write: bool = False


async def probe_accounts(db: Database, registry: Registry, clock: Clock, names: list[str] | None, *,
                         concurrency: int = 16) -> list[ProbeResult]:
    """Probe the named accounts (None: every enabled one), in that order; record what they say.

    A disabled account named explicitly is probed too and keeps ``enabled = false``. Unknown names
    raise ``ConfigError`` before anything is sent. At most ``concurrency`` probes run at once.
    """
    targets = await _read_targets(db, names)
    gate = asyncio.Semaphore(concurrency)

    async def probe(target: _Target) -> _Verdict:
        async with gate:
            return await _probe(target, registry, clock)

    verdicts = await asyncio.gather(*(probe(target) for target in targets))
    return await _write(db, verdicts, clock.time())


async def _read_targets(db: Database, names: list[str] | None) -> list[_Target]:
    async with db.session() as session:
        repo = AccountRepository(session)
        if names is None:
            rows = [row for row in await repo.list() if row.enabled]
        else:
            rows = [await repo.get(name) for name in dict.fromkeys(names)]
        return [_Target(repo.to_spec(row), row.state, row.enabled, row.disabled_reason, row.discovered_models)
                for row in rows]


async def _probe(target: _Target, registry: Registry, clock: Clock) -> _Verdict:
    spec = target.spec

    def verdict(after: str, detail: str, outcome: Outcome, *, until: float | None = None,
                write: bool = False) -> _Verdict:
        reason = None if after == "active" else detail
        if not target.enabled:
            detail += f"; stays disabled ({target.disabled_reason or 'by operator'})"
        result = ProbeResult(spec.name, spec.kind, target.state, after, detail, outcome)
        return _Verdict(result, until, reason, write)

    try:
        secret = resolve_secret(spec.secret)
    except ConfigError as exc:  # the CLI's environment may lack what the server's has: judge nothing
        return verdict(target.state, f"not probed: {exc.message}", "failed")
    try:
        await registry.get(spec.kind).probe(Account(spec, secret))
    except AuthDead as exc:
        return verdict("auth_dead", exc.message, "failed", write=True)
    except QuotaExhausted as exc:
        return verdict("quota_exhausted", exc.message, "failed", until=exc.until, write=True)
    except RateLimited as exc:
        return verdict("cooling_down", exc.message, "failed", until=clock.time() + exc.retry_after, write=True)
    except UpstreamError as exc:  # 5xx, network, overload, a refused route: says nothing about the account
        return verdict(target.state, f"state left as it was: {exc.message}", "failed")
    found = await discover(registry, spec)
    if found.models is None:
        detail = "ok" if found.error is None else f"ok; could not list its models: {found.error}"
        return verdict("active", detail, "ok", write=True)
    what = change(target.discovered, found.models) if target.discovered is not None else ""
    ok = verdict("active", f"ok; serves {len(found.models)} model(s)" + (f" ({what})" if what else ""), "ok",
                 write=True)
    return dataclasses.replace(ok, result=dataclasses.replace(ok.result, models=list(found.models)))


async def _write(db: Database, verdicts: list[_Verdict], now: float) -> list[ProbeResult]:
    """Record the verdicts in one transaction: runtime state (bumping ``config_rev``) and a health
    event for every change. An account removed while it was probed is reported, not recreated."""
    results = []
    async with db.session() as session, session.begin():
        accounts, health = AccountRepository(session), HealthRepository(session)
        for verdict in verdicts:
            result = verdict.result
            if verdict.write:
                try:
                    await accounts.set_runtime_state(result.name, result.after, verdict.until, verdict.reason, now)
                    if result.models is not None:
                        await accounts.set_models(result.name, result.models, now)
                except ConfigError:
                    result = ProbeResult(result.name, result.kind, result.before, result.before,
                                         "removed while it was probed", "failed")
                else:
                    if result.after != result.before:
                        await health.add(result.name, result.after, verdict.until, verdict.reason, now)
            results.append(result)
    return results
