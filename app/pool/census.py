"""What the pool holds and can serve, counted: for the start summary, ``/readyz``, and the error a
request gets when no enabled account serves its model (which says why, and what fixes it).

What a client sees names no account: a client key may not know them (``/v1/pool/status`` hides
them too); the counts and the commands that fix the pool are enough.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from app.errors import SEE_MODELS, KimiPoolError, ModelNotFound, NotConfigured
from app.pool.account import State
from app.pool.scheduler import Pool

ADD_ONE = "'kimi-pool accounts add NAME --kind KIND …' or 'kimi-pool accounts import FILE'"
ENABLE_ONE = "'kimi-pool accounts enable NAME'"
MOST_NAMED = 30
"""Models named at most in a message (the rest are counted)."""


def by_state(pool: Pool) -> dict[str, int]:
    return dict(Counter(account.state.value for account in pool.accounts.values()))


def by_kind(pool: Pool) -> dict[str, int]:
    return dict(Counter(account.kind for account in pool.accounts.values()))


def named(models: frozenset[str] | set[str]) -> str:
    """``a, b, c`` (sorted), cut to ``MOST_NAMED`` with the rest counted."""
    names = sorted(models)
    if len(names) <= MOST_NAMED:
        return ", ".join(names)
    return ", ".join(names[:MOST_NAMED]) + f" and {len(names) - MOST_NAMED} more (GET /v1/models)"


def unserved(pool: Pool, model: str) -> KimiPoolError:
    """The error for a request for ``model`` when no enabled account serves it: there is no account at
    all (add one), none is enabled (enable one), only disabled ones serve it, or none does (these do)."""
    accounts = pool.accounts.values()
    if not accounts:
        return NotConfigured(f"This kimi-pool has no accounts yet, so nothing serves '{model}'. The operator adds "
                             f"one with {ADD_ONE}; a running server takes it within seconds.", code="no_accounts")
    served = pool.models()
    if not served and all(account.state is State.DISABLED for account in accounts):
        return NotConfigured(f"Every account of this kimi-pool ({len(accounts)}) is disabled, so nothing serves "
                             f"'{model}'. The operator enables one with {ENABLE_ONE}.", code="no_enabled_account")
    others = f"The models served are: {named(served)}." if served else "No enabled account serves any model."
    if any(model in account.models for account in accounts):
        return ModelNotFound(f"The model '{model}' is served only by disabled accounts; the operator enables one "
                             f"with {ENABLE_ONE}. {others} {SEE_MODELS}", param="model")
    return ModelNotFound(f"The model '{model}' is not served by this kimi-pool. {others} {SEE_MODELS}",
                         param="model")


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether some account can serve now (``/readyz``), and if not, why and until when."""

    ready: bool
    reason: str | None
    accounts: dict[str, int]
    next_ready_in: float | None
    """Seconds until the first cooldown or timed quota ends, when no account is ready; None if only an
    operator can change that."""


def readiness(pool: Pool, now: float) -> Readiness:
    """Ready when some account is active: able to take requests now or as soon as it has room (a busy
    pool is ready; one whose accounts are all cooling, dead, out of quota or disabled is not)."""
    pool.refresh_states()
    states = by_state(pool)
    if states.get(State.ACTIVE.value):
        return Readiness(True, None, states, None)
    if not states:
        return Readiness(False, f"no accounts: add one with {ADD_ONE}", states, None)
    if set(states) == {State.DISABLED.value}:
        return Readiness(False, f"every account is disabled: enable one with {ENABLE_ONE}", states, None)
    ends = [account.until for account in pool.accounts.values()
            if account.state in (State.COOLING_DOWN, State.QUOTA_EXHAUSTED) and account.until is not None]
    counts = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
    return Readiness(False, f"no account can serve now ({counts})", states,
                     max(0.0, min(ends) - now) if ends else None)
