"""``/admin/accounts``: what ``kimi-pool accounts add/list/edit/disable/enable/reset-limits/remove/check`` do,
over HTTP.

A body has the fields of an ``[[accounts]]`` table of accounts.toml and is checked as the CLI checks it
(``app.account_changes``: a mistake gets the CLI's message, with ``param`` naming the field); a kimi-web token
that has lapsed is refused. ``null`` means a field's default (no limit, the kind's models and base URL,
weight 1, an option unset). Accounts are shown as ``accounts list --json`` shows them: secrets masked.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response

from app.account_changes import ACCOUNT_FIELDS, DEFAULTS, changed, merged, secret_field, validated
from app.api.admin.base import Admin, admin_of, find_account, json_body, listing, reply, text
from app.errors import ConfigError, Conflict
from app.probe import probe_accounts
from app.store.repository import AccountRepository, reaches_differently
from app.views import OPERATOR_REASON, account_view, learned_text

log = logging.getLogger("kimi_pool.admin")


class Accounts(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        """Every account, as ``accounts list --json`` shows it."""

        async def views(session: AsyncSession, now: float) -> list[dict[str, Any]]:
            return [account_view(row, now) for row in await AccountRepository(session).list()]

        return listing(await admin_of(request).read(views))

    async def post(self, request: Request) -> Response:
        """Add an account (201); it serves traffic, with the models its upstream says it serves, when the
        response arrives."""
        admin = admin_of(request)
        body = await json_body(request, ACCOUNT_FIELDS)
        for required in ("name", "kind"):
            if body.get(required) is None:
                raise ConfigError("'name' and 'kind' are required", param=required)
        spec = validated(merged(DEFAULTS, body), secret_field(body), admin.gateway.clock.time(), check_token=True)

        async def add(session: AsyncSession, now: float) -> None:
            repo = AccountRepository(session)
            if await _exists(repo, spec.name):
                raise Conflict(f"an account named {spec.name} already exists", param="name")
            await repo.add(dataclasses.replace(spec, enabled=True), now)
            if not spec.enabled:
                await repo.set_enabled(spec.name, False, OPERATOR_REASON, now)

        await admin.write(add)
        log.info("admin: added account %s (%s%s)", spec.name, spec.kind, "" if spec.enabled else ", disabled")
        return reply(await _discovered(admin, spec.name), 201)


class Account(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        name = request.path_params["name"]

        async def view(session: AsyncSession, now: float) -> dict[str, Any]:
            return account_view(await find_account(session, name), now)

        return reply(await admin_of(request).read(view))

    async def patch(self, request: Request) -> Response:
        """Change any fields; the account as it is then is checked as a whole. ``enabled`` works as
        ``/disable`` and ``/enable`` do (enabling also revives a dead or cooling account). A new key or token
        revives it too; with a new key, token or base URL its upstream is asked again which models it serves."""
        admin = admin_of(request)
        name = request.path_params["name"]
        body = await json_body(request, ACCOUNT_FIELDS)

        async def change(session: AsyncSession, now: float) -> bool:
            repo = AccountRepository(session)
            row = await find_account(session, name)
            was_enabled, before = row.enabled, repo.to_spec(row)
            spec = changed(before, body, now)
            await repo.upsert(dataclasses.replace(spec, enabled=was_enabled), now)
            if spec.enabled != was_enabled:
                await repo.set_enabled(name, spec.enabled, None if spec.enabled else OPERATOR_REASON, now)
            return reaches_differently(before, spec)

        moved = await admin.write(change, scrub=secret_field(body) is not None or "proxy" in body)
        log.info("admin: changed account %s (%s)", name, ", ".join(sorted(body)) or "nothing")
        if moved:
            return reply(await _discovered(admin, name))
        return reply(await admin.read(lambda session, now: _view(session, name, now)))

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


async def reset_limits(request: Request) -> Response:
    """Forget the limits learned from the upstream's 429s (``accounts reset-limits NAME``): the configured ones
    hold again as the response arrives. Answers the account, with ``forgotten``: what was learned."""
    admin = admin_of(request)
    name = request.path_params["name"]
    await json_body(request, (), optional=True)

    async def reset(session: AsyncSession, now: float) -> dict[str, Any]:
        await find_account(session, name)
        return await AccountRepository(session).reset_limits(name, now)

    forgotten = await admin.write(reset)
    log.info("admin: reset the learned limits of account %s (%s)", name, learned_text(forgotten) or "none")
    view = await admin.read(lambda session, now: _view(session, name, now))
    return reply({**view, "forgotten": forgotten})


async def probe_account(request: Request) -> Response:
    """One free upstream request (``accounts check NAME``); its verdict becomes the account's state. A working
    account's upstream is also asked which models it serves."""
    admin = admin_of(request)
    name = request.path_params["name"]
    await json_body(request, (), optional=True)
    await admin.read(lambda session, _now: find_account(session, name))
    await admin.writer.flush()  # the verdict's reload must not bring back an older state than the pool's
    [result] = await probe_accounts(admin.db, admin.registry, admin.gateway.clock, [name])
    await admin.reload()
    log.info("admin: probed account %s: %s -> %s (%s)", name, result.before, result.after, result.outcome)
    return reply(dataclasses.asdict(result))


async def _set_enabled(request: Request, name: str, enabled: bool, reason: str | None) -> dict[str, Any]:
    async def change(session: AsyncSession, now: float) -> dict[str, Any]:
        await find_account(session, name)
        return account_view(await AccountRepository(session).set_enabled(name, enabled, reason, now), now)

    return await admin_of(request).write(change)


async def _discovered(admin: Admin, name: str) -> dict[str, Any]:
    """Ask the account's upstream which models it serves (stored, and the pool reloaded, if it says); then the
    account's view, with ``discovery_error`` when it could not be asked."""
    [found] = await admin.discovery.refresh([name])
    view = await admin.read(lambda session, now: _view(session, name, now))
    return {**view, "discovery_error": found.error} if found.error else view


async def _view(session: AsyncSession, name: str, now: float) -> dict[str, Any]:
    return account_view(await find_account(session, name), now)


async def _exists(repo: AccountRepository, name: str) -> bool:
    try:
        await repo.get(name)
    except ConfigError:
        return False
    return True
