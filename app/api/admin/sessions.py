"""``/admin/sessions``: which account holds which conversation (``kimi-pool sessions list``), and
forgetting one, so that its next turn is placed afresh."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from app.api.admin.base import admin_of, listing, query, reply, whole
from app.errors import NotFound
from app.store.sessions import SessionRepository
from app.views import session_view

log = logging.getLogger("kimi_pool.admin")


async def list_sessions(request: Request) -> Response:
    """``?account=NAME&limit=50``: the most recently used first, expired ones included."""
    params = query(request, ("account", "limit"))
    account, limit = params.get("account") or None, whole(params, "limit", 50)

    async def views(session: AsyncSession, now: float) -> list[dict[str, Any]]:
        rows = await SessionRepository(session).list(account=account, limit=limit)
        return [session_view(row, now) for row in rows]

    return listing(await admin_of(request).read(views))


async def delete_session(request: Request) -> Response:
    """Forget a conversation, in the running server as well as in the database (unlike ``sessions purge``)."""
    key = request.path_params["key"]
    admin = admin_of(request)
    held = admin.gateway.sessions.drop(key) is not None  # announces it expired: the flush below writes that

    async def delete(session: AsyncSession, _now: float) -> bool:
        return await SessionRepository(session).delete(key)

    stored = await admin.write(delete, reload=False)
    if not (held or stored):
        raise NotFound(f"no session with key {key!r}")
    log.info("admin: deleted session %s", key)
    return reply({"key": key, "deleted": True})
