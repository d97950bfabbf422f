"""An operator's account as fields (an ``[[accounts]]`` table of accounts.toml, a body of the admin API), and
a change to a stored one (``accounts edit``, ``PATCH /admin/accounts/{name}``): the given fields over the
stored ones, checked as a whole by ``make_account_spec``, as a new account is. Opens nothing.

``None`` for a field puts it back to its default (no limit, the kind's base URL, no model list of its own,
weight 1, an option unset). The secret may be given as ``api_key``, ``token`` or ``secret``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.accounts_config import OPTION_KEYS, AccountSpec, make_account_spec, mask_secret, mask_url
from app.errors import ConfigError
from app.kimi_auth import check_fresh

SECRET_FIELDS = ("api_key", "token", "secret")
ACCOUNT_FIELDS = ("name", "kind", *SECRET_FIELDS, "base_url", "models", "rpm", "tpm", "tpd", "concurrency", "weight",
                  "proxy", "enabled", *OPTION_KEYS)
DEFAULTS: dict[str, Any] = {"name": None, "kind": None, "secret": None, "base_url": None, "models": [], "rpm": None,
                            "tpm": None, "tpd": None, "concurrency": None, "weight": 1.0, "proxy": None,
                            "enabled": True}
_SECRET_FIELD_OF_KIND = {"moonshot": "api_key", "kimi-web": "token"}


def secret_field(fields: Mapping[str, Any]) -> str | None:
    """Which of ``api_key``, ``token``, ``secret`` the fields give the secret as (at most one)."""
    given = [field for field in SECRET_FIELDS if field in fields]
    if len(given) > 1:
        raise ConfigError(f"give only one of {', '.join(SECRET_FIELDS)}", param=given[1])
    return given[0] if given else None


def fields_of(spec: AccountSpec) -> dict[str, Any]:
    """A stored account as fields (the secret under ``secret``, options apart)."""
    return {"name": spec.name, "kind": spec.kind, "secret": spec.secret, "base_url": spec.base_url,
            "models": list(spec.models), "rpm": spec.rpm, "tpm": spec.tpm, "tpd": spec.tpd,
            "concurrency": spec.concurrency, "weight": spec.weight, "proxy": spec.proxy, "enabled": spec.enabled,
            "options": dict(spec.extra)}


def merged(table: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` with the changed fields over it; ``None`` puts a field back to its default."""
    out = {**table, "options": dict(table.get("options", {}))}
    for field, value in changes.items():
        if field in SECRET_FIELDS:
            out["secret"] = value
        elif field in OPTION_KEYS:
            if value is None:
                out["options"].pop(field, None)
            else:
                out["options"][field] = value
        else:
            out[field] = DEFAULTS[field] if value is None else value
    return out


def validated(table: Mapping[str, Any], given_as: str | None, now: float, *, check_token: bool) -> AccountSpec:
    """``make_account_spec`` on the fields, then (``check_token``) a kimi-web token's expiry; a problem with
    the secret names the field it was ``given_as``."""
    field = given_as or _SECRET_FIELD_OF_KIND.get(str(table["kind"]), "secret")
    try:
        spec = make_account_spec(
            name=table["name"], kind=table["kind"], secret=table["secret"], base_url=table["base_url"],
            models=table["models"], rpm=table["rpm"], tpm=table["tpm"], tpd=table["tpd"],
            concurrency=table["concurrency"], weight=table["weight"], proxy=table["proxy"],
            enabled=table["enabled"], options=table["options"],
        )
    except ConfigError as exc:
        if exc.param == "secret":
            exc.param = field
        raise
    if check_token and spec.kind == "kimi-web" and spec.secret and not spec.secret.startswith("env:"):
        try:
            check_fresh(spec.secret, now, spec.name)
        except ConfigError as exc:
            exc.param = field
            raise
    return spec


def changed(spec: AccountSpec, changes: Mapping[str, Any], now: float) -> AccountSpec:
    """``spec`` with ``changes`` (fields of ``ACCOUNT_FIELDS``) applied, checked as a whole. The name stays."""
    if "name" in changes and changes["name"] != spec.name:
        raise ConfigError(f"account {spec.name} cannot be renamed: add it under the new name and remove this one",
                          param="name")
    given_as = secret_field(changes)
    return validated(merged(fields_of(spec), changes), given_as, now,
                     check_token=given_as is not None or "kind" in changes)


def differences(before: AccountSpec, after: AccountSpec) -> list[str]:
    """What changed, for people: ``rpm 60 -> 120``, ``key sk-o…AAAA -> sk-n…BBBB`` (secrets masked)."""
    def shown(field: str, spec: AccountSpec) -> str:
        if field == "secret":
            return mask_secret(spec.secret)
        if field in ("base_url", "proxy"):
            return mask_url(getattr(spec, field)) or "default"
        if field == "models":
            return ",".join(spec.models) or "default"
        if field == "options":
            return ",".join(f"{k}={v}" for k, v in sorted(spec.extra.items())) or "none"
        value = getattr(spec, field)
        return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    names = {"secret": "key", "base_url": "base URL"}
    out = []
    for field in ("secret", "base_url", "proxy", "models", "rpm", "tpm", "tpd", "concurrency", "weight", "options"):
        old, new = shown(field, before), shown(field, after)
        if old != new or (field == "secret" and before.secret != after.secret):
            out.append(f"{names.get(field, field)} {old} -> {new}")
    return out
