"""The conversation bindings' table (``app.pool.sessions.Binding``): load, upsert, list, purge.

Like every repository it flushes but never commits (``app.store.repository`` says more).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, Table, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.pool.sessions import Binding
from app.store.models import SessionRow
from app.store.repository import CHUNK

_SESSION_TABLE = cast(Table, SessionRow.__table__)
_SESSION_VALUES = ("account", "chat_id", "parent_id", "turns", "last_used", "expires_at", "client_key")


def _session_params(binding: Binding) -> dict[str, Any]:
    return {"key": binding.key, "account": binding.account, "chat_id": binding.chat_id,
            "parent_id": binding.parent_id, "turns": binding.turns, "last_used": binding.last_used,
            "expires_at": binding.expires_at, "client_key": binding.client}


class SessionRepository:
    """Conversation bindings (``app.pool.sessions.Binding``), one row per key."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def load_active(self, now: float) -> list[Binding]:
        """Every binding not expired at ``now``, least recently used first."""
        rows = await self._session.scalars(
            select(SessionRow).where(SessionRow.expires_at > now).order_by(SessionRow.last_used, SessionRow.key)
        )
        return [Binding(key=r.key, account=r.account, chat_id=r.chat_id, parent_id=r.parent_id, turns=r.turns or 0,
                        last_used=r.last_used, expires_at=r.expires_at, client=r.client_key) for r in rows]

    async def upsert_many(self, bindings: Sequence[Binding]) -> None:
        """Write the bindings, creating or overwriting each key's row (one statement on SQLite and
        PostgreSQL; an update, then inserts of the missing keys, elsewhere)."""
        if not bindings:
            return
        # one row per key, the last binding given wins (PostgreSQL refuses to update a row twice in one statement)
        params = list({b.key: _session_params(b) for b in bindings}.values())
        dialect = (await self._session.connection()).dialect.name
        if dialect not in ("sqlite", "postgresql"):
            await self._update_then_insert(params)
            return
        module: Any = importlib.import_module(f"sqlalchemy.dialects.{dialect}")  # PostgreSQL's only when in use
        stmt = module.insert(_SESSION_TABLE)
        stmt = stmt.on_conflict_do_update(index_elements=[_SESSION_TABLE.c.key],
                                          set_={name: stmt.excluded[name] for name in _SESSION_VALUES})
        for start in range(0, len(params), CHUNK):
            await self._session.execute(stmt, params[start:start + CHUNK])

    async def _update_then_insert(self, params: Sequence[dict[str, Any]]) -> None:
        """The portable upsert, for dialects without ``ON CONFLICT``."""
        for start in range(0, len(params), CHUNK):
            chunk = {p["key"]: p for p in params[start:start + CHUNK]}
            found = set(await self._session.scalars(select(SessionRow.key).where(SessionRow.key.in_(chunk))))
            for key in found:
                await self._session.execute(
                    update(_SESSION_TABLE).where(_SESSION_TABLE.c.key == key)
                    .values({name: chunk[key][name] for name in _SESSION_VALUES})
                )
            missing = [p for key, p in chunk.items() if key not in found]
            if missing:
                await self._session.execute(insert(_SESSION_TABLE), missing)

    async def list(self, account: str | None = None, limit: int = 100) -> Sequence[SessionRow]:
        """The most recently used first, optionally of one account; expired rows included."""
        query = select(SessionRow).order_by(SessionRow.last_used.desc(), SessionRow.key).limit(limit)
        if account is not None:
            query = query.where(SessionRow.account == account)
        return (await self._session.scalars(query)).all()

    async def purge(self, now: float, older_than: float | None = None) -> int:
        """Delete the rows expired at ``now`` and, if given, those last used before ``older_than``."""
        condition = SessionRow.expires_at <= now
        if older_than is not None:
            condition = or_(condition, SessionRow.last_used < older_than)
        result = await self._session.execute(
            delete(SessionRow).where(condition).execution_options(synchronize_session=False)
        )
        return int(cast(CursorResult[Any], result).rowcount or 0)

    async def delete(self, key: str) -> bool:
        """Delete one key's row; False if there was none."""
        result = await self._session.execute(
            delete(SessionRow).where(SessionRow.key == key).execution_options(synchronize_session=False)
        )
        return bool(cast(CursorResult[Any], result).rowcount)
