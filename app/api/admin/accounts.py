"""``/admin/accounts``: what ``kimi-pool accounts add/list/disable/enable/remove/check`` do, over HTTP.

A body has the fields of an ``[[accounts]]`` table of accounts.toml and is checked by the same
``make_account_spec`` (so a mistake gets the CLI's message, with ``param`` naming the field); a
kimi-web token that has lapsed is refused. ``null`` means a field's default (no limit, the kind's
models and base URL, weight 1, an option unset). Accounts are shown as ``accounts list --json``
shows them: secrets masked.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response

from app.accounts_config import OPTION_KEYS, AccountSpec, make_account_spec
from app.api.admin.base import admin_of, find_account, json_body, listing, reply, text
from app.errors import ConfigError, Conflict
from app.kimi_auth import check_fresh
from app.probe import probe_accounts
from app.store.repository import AccountRepository
from app.views import OPERATOR_REASON, account_view

log = logging.getLogger("kimi_pool.admin")

SECRET_FIELDS = ("api_key", "token", "secret")
ACCOUNT_FIELDS = ("name", "kind", *SECRET_FIELDS, "base_url", "models", "rpm", "tpm", "tpd", "concurrency", "weight",
                  "proxy", "enabled", *OPTION_KEYS)
_DEFAULTS: dict[str, Any] = {"name": None, "kind": None, "secret": None, "base_url": None, "models": [], "rpm": None,
                             "tpm": None, "tpd": None, "concurrency": None, "weight": 1.0, "proxy": None,
                             "enabled": True}
_SECRET_FIELD_OF_KIND = {"moonshot": "api_key", "kimi-web": "token"}


class Accounts(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        """Every account, as ``accounts list --json`` shows it."""

        async def views(session: AsyncSession, _now: float) -> list[dict[str, Any]]:
            return [account_view(row) for row in await AccountRepository(session).list()]

        return listing(await admin_of(request).read(views))

    async def post(self, request: Request) -> Response:
        """Add an account (201); it serves traffic when the response arrives."""
        admin = admin_of(request)
        body = await json_body(request, ACCOUNT_FIELDS)
        for required in ("name", "kind"):
            if body.get(required) is None:
                raise ConfigError("'name' and 'kind' are required", param=required)
        secret_field = _secret_field(body)
        spec = _validated(_merged(_DEFAULTS, body), secret_field, admin.gateway.clock.time(), check_token=True)

        async def add(session: AsyncSession, now: float) -> dict[str, Any]:
            repo = AccountRepository(session)
            if await _exists(repo, spec.name):
                raise Conflict(f"an account named {spec.name} already exists", param="name")
            row = await repo.add(dataclasses.replace(spec, enabled=True), now)
            if not spec.enabled:
                row = await repo.set_enabled(spec.name, False, OPERATOR_REASON, now)
            return account_view(row)

        view = await admin.write(add)
        log.info("admin: added account %s (%s%s)", spec.name, spec.kind, "" if spec.enabled else ", disabled")
        return reply(view, 201)


class Account(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        name = request.path_params["name"]

        async def view(session: AsyncSession, _now: float) -> dict[str, Any]:
            return account_view(await find_account(session, name))

        return reply(await admin_of(request).read(view))

    async def patch(self, request: Request) -> Response:
        """Change any fields; the account as it is then is checked as a whole. ``enabled`` works as
        ``/disable`` and ``/enable`` do (enabling also revives a dead or cooling account)."""
        admin = admin_of(request)
        name = request.path_params["name"]
        body = await json_body(request, ACCOUNT_FIELDS)
        if "name" in body and body["name"] != name:
            raise ConfigError(f"account {name} cannot be renamed: add it under the new name and remove this one",
                              param="name")
        secret_field = _secret_field(body)

        async def change(session: AsyncSession, now: float) -> dict[str, Any]:
            repo = AccountRepository(session)
            row = await find_account(session, name)
            was_enabled = row.enabled
            table = _merged(_table(repo.to_spec(row)), body)
            spec = _validated(table, secret_field, now, check_token=secret_field is not None or "kind" in body)
            await repo.upsert(dataclasses.replace(spec, enabled=was_enabled), now)
            if spec.enabled != was_enabled:
                await repo.set_enabled(name, spec.enabled, None if spec.enabled else OPERATOR_REASON, now)
            return account_view(row)

        view = await admin.write(change, scrub=secret_field is not None or "proxy" in body)
        log.info("admin: changed account %s (%s)", name, ", ".join(sorted(body)) or "nothing")
        return reply(view)

    async def delete(self, request: Request) -> Response:
        """Remove an account; its usage history is kept."""
        name = request.path_params["name"]

        async def remove(session: AsyncSession, _now: float) -> None:
            await find_account(session, name)
            await AccountRepository(session).remove(name)

        await admin_of(request).write(remove, scrub=True)
        log.info("admin: removed account %s", name)
        return reply({"name": name, "deleted": True})


async def disable_account(request: Request) -> Response:
    """Take an account out of the pool (optional ``{"reason": "…"}``, shown in listings)."""
    name = request.path_params["name"]
    reason = text(await json_body(request, ("reason",), optional=True), "reason") or OPERATOR_REASON
    view = await _set_enabled(request, name, False, reason)
    log.info("admin: disabled account %s", name)
    return reply(view)


async def enable_account(request: Request) -> Response:
    """Put an account back in the pool; also clears a dead, cooling or exhausted state."""
    name = request.path_params["name"]
    await json_body(request, (), optional=True)
    view = await _set_enabled(request, name, True, None)
    log.info("admin: enabled account %s", name)
    return reply(view)


async def probe_account(request: Request) -> Response:
    """One free upstream request (``accounts check NAME``); its verdict becomes the account's state."""
    admin = admin_of(request)
    name = request.path_params["name"]
    await json_body(request, (), optional=True)
    await admin.read(lambda session, _now: find_account(session, name))
    [result] = await probe_accounts(admin.db, admin.registry, admin.gateway.clock, [name])
    await admin.reload()
    log.info("admin: probed account %s: %s -> %s (%s)", name, result.before, result.after, result.outcome)
    return reply(dataclasses.asdict(result))


async def _set_enabled(request: Request, name: str, enabled: bool, reason: str | None) -> dict[str, Any]:
    async def change(session: AsyncSession, now: float) -> dict[str, Any]:
        await find_account(session, name)
        return account_view(await AccountRepository(session).set_enabled(name, enabled, reason, now))

    return await admin_of(request).write(change)


async def _exists(repo: AccountRepository, name: str) -> bool:
    try:
        await repo.get(name)
    except ConfigError:
        return False
    return True


def _secret_field(body: dict[str, Any]) -> str | None:
    given = [field for field in SECRET_FIELDS if field in body]
    if len(given) > 1:
        raise ConfigError(f"give only one of {', '.join(SECRET_FIELDS)}", param=given[1])
    return given[0] if given else None


def _table(spec: AccountSpec) -> dict[str, Any]:
    """A stored account as the fields of a request body (the secret under ``secret``, options apart)."""
    return {"name": spec.name, "kind": spec.kind, "secret": spec.secret, "base_url": spec.base_url,
            "models": list(spec.models), "rpm": spec.rpm, "tpm": spec.tpm, "tpd": spec.tpd,
            "concurrency": spec.concurrency, "weight": spec.weight, "proxy": spec.proxy, "enabled": spec.enabled,
            "options": dict(spec.extra)}


def _merged(table: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """``table`` with the body's fields over it; ``null`` puts a field back to its default."""
    merged = {**table, "options": dict(table.get("options", {}))}
    for field, value in body.items():
        if field in SECRET_FIELDS:
            merged["secret"] = value
        elif field in OPTION_KEYS:
            if value is None:
                merged["options"].pop(field, None)
            else:
                merged["options"][field] = value
        else:
            merged[field] = _DEFAULTS[field] if value is None else value
    return merged


def _validated(table: dict[str, Any], secret_field: str | None, now: float, *, check_token: bool) -> AccountSpec:
    """The CLI's checks (``make_account_spec``, then a kimi-web token's expiry), errors naming the body's field."""
    field = secret_field or _SECRET_FIELD_OF_KIND.get(str(table["kind"]), "secret")
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
