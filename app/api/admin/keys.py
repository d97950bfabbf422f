"""``/admin/keys``: the client API keys (``kimi-pool keys create/list/revoke``).

A key is shown once, in the response that creates it; only its hash and prefix are stored, and
listings show the prefix. A new key works, and a revoked one is refused, as soon as the response
arrives.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response

from app.api.admin.base import admin_of, json_body, listing, reply
from app.errors import ConfigError, Conflict, NotFound
from app.store.models import ClientKeyRow
from app.store.repository import ClientKeyRepository
from app.views import key_view

log = logging.getLogger("kimi_pool.admin")


class Keys(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        """Every client key, revoked ones too, by name and prefix."""

        async def views(session: AsyncSession, _now: float) -> list[dict[str, Any]]:
            return [key_view(row) for row in await ClientKeyRepository(session).list()]

        return listing(await admin_of(request).read(views))

    async def post(self, request: Request) -> Response:
        """Create a key ``{"name": …}`` (201); the response holds the key, which is not shown again."""
        body = await json_body(request, ("name",))
        name = body.get("name")
        if name is None:
            raise ConfigError("'name' is required", param="name")

        async def create(session: AsyncSession, now: float) -> dict[str, Any]:
            repo = ClientKeyRepository(session)
            if await _find(repo, name) is not None:
                raise Conflict(f"a key named {name} already exists (revoked keys keep their name)", param="name")
            try:
                key = await repo.create(name, now)
            except ConfigError as exc:  # the name is all it checks
                exc.param = "name"
                raise
            row = await _find(repo, name)
            assert row is not None
            return {**key_view(row), "key": key}

        view = await admin_of(request).write(create)
        log.info("admin: created client key %s (%s…)", name, view["prefix"])
        return reply(view, 201)


async def revoke_key(request: Request) -> Response:
    """``DELETE /admin/keys/{name}``: revoke a key; requests with it are refused from then on."""
    name = request.path_params["name"]

    async def revoke(session: AsyncSession, now: float) -> dict[str, Any]:
        repo = ClientKeyRepository(session)
        row = await _find(repo, name)
        if row is None:
            raise NotFound(f"no key named {name}")
        await repo.revoke(name, now)
        return key_view(row)

    view = await admin_of(request).write(revoke)
    log.info("admin: revoked client key %s", name)
    return reply(view)


async def _find(repo: ClientKeyRepository, name: str) -> ClientKeyRow | None:
    return next((row for row in await repo.list() if row.name == name), None)
