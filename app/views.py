"""What the CLI's ``--json`` output and the admin API show of stored rows: plain, JSON-ready dicts.

One function per kind of row, shared by both, so a field means the same thing wherever it is read.
Secrets never leave here unmasked: an account's key is ``mask_secret``-ed, credentials in its URLs
are replaced by ``***``, a client key is shown by its prefix (the key itself is not stored), and
reasons are redacted (a row written before reasons were redacted on the way in may quote a key).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts_config import AliasSpec, mask_secret, mask_url
from app.catalogue import Catalogue, alias_served, alias_warning
from app.errors import ConfigError
from app.kimi_auth import read_token
from app.pool.limits import Limits
from app.redact import redact_optional
from app.store.models import AccountRow, ClientKeyRow, HealthEventRow, SessionRow
from app.store.repository import AccountRepository, AliasRepository
from app.store.usage import UsageLine

OPERATOR_REASON = "disabled by operator"
"""The reason an account disabled by an operator shows when none was given."""


def account_view(row: AccountRow, now: float) -> dict[str, Any]:
    """An account as ``accounts list --json`` and the admin API show it. ``state``: ``disabled`` if an operator
    took it out, ``auth_dead`` if the server could not load its credential (``load_error``, e.g. an ``env:VAR``
    unset in the server's environment), else the server's runtime state. ``models`` is the operator's list
    (an override), ``serves`` what it serves and ``models_source`` where that comes from. ``effective_limits``
    are the limits at ``now``, after what the server learned from the upstream's 429s."""
    spec = AccountRepository.to_spec(row)
    broken = row.enabled and row.load_error is not None
    limits = Limits(spec, row.learned_limits)
    effective = limits.current(now)
    return {
        "name": row.name,
        "kind": row.kind,
        "enabled": row.enabled,
        "state": "auth_dead" if broken else row.state if row.enabled else "disabled",
        "runtime_state": row.state,
        "until": row.state_until if row.enabled and not broken else None,
        "reason": redact_optional(row.load_error if broken else row.state_reason if row.enabled
                                  else row.disabled_reason),
        "load_error": redact_optional(row.load_error),
        "base_url": mask_url(row.base_url),
        "models": list(row.models or ()),
        "serves": list(spec.effective_models(row.discovered_models)),
        "models_source": spec.models_source(row.discovered_models),
        "discovered_models": row.discovered_models,
        "models_checked_at": row.models_checked_at,
        "rpm": row.rpm,
        "tpm": row.tpm,
        "tpd": row.tpd,
        "concurrency": row.concurrency,
        "effective_limits": effective,
        "learned_limits": limits.learned(),
        "weight": row.weight,
        "proxy": mask_url(row.proxy),
        "key": mask_secret(row.secret),
        "token_expires": token_expires(row),
        "options": dict(row.options or {}),
        "config_rev": row.config_rev,
    }


def learned_text(learned: Mapping[str, Mapping[str, float]]) -> str:
    """``rpm=3, tpm=9000``: learned limits, for people."""
    return ", ".join(f"{bucket}={int(entry['limit'])}" for bucket, entry in learned.items())


def token_expires(row: AccountRow) -> float | None:
    """When a kimi-web account's token lapses (None: another kind, or a token given as env:VAR)."""
    if row.kind != "kimi-web" or not row.secret or row.secret.startswith("env:"):
        return None
    try:
        return read_token(row.secret).expires_at
    except ConfigError:
        return None


def key_view(row: ClientKeyRow) -> dict[str, Any]:
    return {"name": row.name, "prefix": row.key_prefix, "created_at": row.created_at,
            "revoked_at": row.revoked_at}


def session_view(row: SessionRow, now: float) -> dict[str, Any]:
    return {"key": row.key, "account": row.account, "chat_id": row.chat_id, "parent_id": row.parent_id,
            "last_used": row.last_used, "expires_at": row.expires_at, "expired": row.expires_at <= now}


def event_view(row: HealthEventRow) -> dict[str, Any]:
    """An account's state transition: when, to which state, until when, and why."""
    return {"id": row.id, "ts": row.ts, "account": row.account, "state": row.state, "until": row.until,
            "reason": redact_optional(row.reason)}


def usage_numbers(line: UsageLine) -> dict[str, Any]:
    """The figures of one line of a usage report (as ``kimi-pool usage --json`` prints them)."""
    return {"requests": line.requests, "ok": line.ok, "errors": line.errors, "prompt_tokens": line.prompt_tokens,
            "completion_tokens": line.completion_tokens, "total_tokens": line.total_tokens,
            "avg_latency_ms": round(line.avg_latency_ms, 1), "streams": line.streams}


async def offered(session: AsyncSession) -> dict[str, set[str]]:
    """Account kind → every model id its accounts serve (for the kinds the pool has)."""
    out: dict[str, set[str]] = {}
    for row in await AccountRepository(session).list():
        spec = AccountRepository.to_spec(row)
        out.setdefault(row.kind, set()).update(spec.effective_models(row.discovered_models))
    return out


async def unserved_alias(session: AsyncSession, alias: AliasSpec, *, force: bool, flag: str) -> str | None:
    """Check an alias about to be stored: if no account would serve it, refuse it (``ConfigError``, saying how
    to keep it anyway: ``flag``) unless ``force``. Returns what is still wrong with it, to warn about (a target
    that one kind no longer offers while another kind serves it; anything, when forced)."""
    kinds = await offered(session)
    warning = alias_warning(alias.targets, kinds)
    if not alias_served(alias.targets, kinds) and not force:
        raise ConfigError(f"alias {alias.name}: {warning}; see what is served with 'kimi-pool models list', or "
                          f"give {flag} to keep the alias anyway", param=next(iter(alias.targets), None))
    return warning


async def catalogue_view(session: AsyncSession) -> list[dict[str, Any]]:
    """Every model name clients may ask for: its alias targets (None if it is no alias), the accounts serving
    it (``name as upstream-id`` where the account knows it by another id) and, for an alias that no account
    serves or whose target an account kind no longer offers, a ``warning`` (``catalogue.alias_warning``)."""
    catalogue = Catalogue.with_overrides(await AliasRepository(session).list())
    served: dict[str, list[str]] = {}
    for row in await AccountRepository(session).list():
        spec = AccountRepository.to_spec(row)
        for model, upstream in catalogue.served_by(spec, row.discovered_models).items():
            served.setdefault(model, []).append(row.name if upstream == model else f"{row.name} as {upstream}")
    names = sorted(set(served) | set(catalogue.aliases))
    aliases, kinds = catalogue.aliases, await offered(session)
    return [{"model": name, "alias": dict(aliases.get(name, {})) or None, "accounts": served.get(name, []),
             "warning": alias_warning(aliases[name], kinds) if name in aliases and kinds else None}
            for name in names]
