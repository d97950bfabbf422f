"""What the CLI's ``--json`` output and the admin API show of stored rows: plain, JSON-ready dicts.

One function per kind of row, shared by both, so a field means the same thing wherever it is read.
Secrets never leave here unmasked: an account's key is ``mask_secret``-ed, credentials in its URLs
are replaced by ``***``, a client key is shown by its prefix (the key itself is not stored), and
reasons are redacted (a row written before reasons were redacted on the way in may quote a key).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts_config import mask_secret, mask_url
from app.catalogue import Catalogue
from app.errors import ConfigError
from app.kimi_auth import read_token
from app.redact import redact_optional
from app.store.models import AccountRow, ClientKeyRow, HealthEventRow, SessionRow
from app.store.repository import AccountRepository, AliasRepository
from app.store.usage import UsageLine

OPERATOR_REASON = "disabled by operator"
"""The reason an account disabled by an operator shows when none was given."""


def account_view(row: AccountRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "kind": row.kind,
        "enabled": row.enabled,
        "state": row.state if row.enabled else "disabled",
        "runtime_state": row.state,
        "until": row.state_until if row.enabled else None,
        "reason": redact_optional(row.state_reason if row.enabled else row.disabled_reason),
        "base_url": mask_url(row.base_url),
        "models": list(row.models or ()),
        "rpm": row.rpm,
        "tpm": row.tpm,
        "tpd": row.tpd,
        "concurrency": row.concurrency,
        "weight": row.weight,
        "proxy": mask_url(row.proxy),
        "key": mask_secret(row.secret),
        "token_expires": token_expires(row),
        "options": dict(row.options or {}),
        "config_rev": row.config_rev,
    }


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


async def catalogue_view(session: AsyncSession) -> list[dict[str, Any]]:
    """Every model name clients may ask for: its alias targets (None if it is no alias) and the
    accounts serving it (``name as upstream-id`` where the account knows it by another id)."""
    catalogue = Catalogue.with_overrides(await AliasRepository(session).list())
    served: dict[str, list[str]] = {}
    for row in await AccountRepository(session).list():
        spec = AccountRepository.to_spec(row)
        for model, upstream in catalogue.served_by(spec).items():
            served.setdefault(model, []).append(row.name if upstream == model else f"{row.name} as {upstream}")
    names = sorted(set(served) | set(catalogue.aliases))
    return [{"model": name, "alias": dict(catalogue.aliases.get(name, {})) or None,
             "accounts": served.get(name, [])} for name in names]
