"""``/admin/models``: the model catalogue and its aliases (``kimi-pool models list/alias/unalias``).

``PUT /admin/models/{alias}`` takes the upstream model id per account kind,
``{"moonshot": "…", "kimi-web": "…", "kimi-ai-chat": "…"}`` (at least one); ``/v1/models`` shows
the change as soon as the response arrives. An alias no account would serve is refused (400) unless the
body says ``"force": true``; the entry's ``warning`` says what is wrong with one. Deleting a built-in alias
hides it.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response

from app.accounts_config import ACCOUNT_KINDS, make_alias
from app.api.admin.base import admin_of, json_body, listing, reply
from app.catalogue import BUILTIN_ALIASES
from app.errors import ConfigError, NotFound
from app.store.repository import AliasRepository, UpsertResult
from app.views import catalogue_view, unserved_alias

log = logging.getLogger("kimi_pool.admin")


async def list_catalogue(request: Request) -> Response:
    """Every model name clients may ask for, as ``models list --json`` shows it."""
    return listing(await admin_of(request).read(lambda session, _now: catalogue_view(session)))


class Alias(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        """One model name's catalogue entry (an alias or a model some account serves)."""
        name = request.path_params["alias"]
        catalogue = await admin_of(request).read(lambda session, _now: catalogue_view(session))
        entry = next((entry for entry in catalogue if entry["model"] == name), None)
        if entry is None:
            raise NotFound(f"no model or alias named {name}")
        return reply(entry)

    async def put(self, request: Request) -> Response:
        """Create (201) or replace (200) an alias; answers with its catalogue entry."""
        name = request.path_params["alias"]
        body = await json_body(request, (*ACCOUNT_KINDS, "force"))
        force = body.pop("force", False)
        if not isinstance(force, bool):
            raise ConfigError("'force' must be true or false", param="force")
        targets = {kind: model for kind, model in body.items() if model is not None}
        if not targets:
            raise ConfigError(f"give at least one of {', '.join(ACCOUNT_KINDS)}")
        alias = make_alias(name, targets)

        async def put(session: AsyncSession, now: float) -> tuple[UpsertResult, dict[str, Any]]:
            await unserved_alias(session, alias, force=force, flag='"force": true')
            result = await AliasRepository(session).put(alias, now)
            entry = next(entry for entry in await catalogue_view(session) if entry["model"] == name)
            return result, entry

        result, entry = await admin_of(request).write(put)
        log.info("admin: alias %s %s", name, result)
        return reply({**entry, "result": result}, 201 if result == "created" else 200)

    async def delete(self, request: Request) -> Response:
        """Remove an alias (a built-in one is hidden)."""
        name = request.path_params["alias"]

        async def remove(session: AsyncSession, now: float) -> None:
            repo = AliasRepository(session)
            if name in BUILTIN_ALIASES:
                await repo.put(make_alias(name, {}), now)
            elif not await repo.remove(name):
                raise NotFound(f"no alias named {name}")

        await admin_of(request).write(remove)
        log.info("admin: removed alias %s", name)
        return reply({"model": name, "deleted": True})

