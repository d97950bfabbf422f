"""The server's own secrets (``server_secrets``): made once, then read by every process and instance."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.store.db import Database
from app.store.models import ServerSecretRow


async def server_secret(db: Database, name: str, make: bytes, now: float) -> bytes:
    """The secret called ``name``; ``make`` becomes it if there is none yet (the first to store one wins)."""
    query = select(ServerSecretRow.value).where(ServerSecretRow.name == name)
    async with db.session() as session:
        found = await session.scalar(query)
    if found is not None:
        return found
    try:
        async with db.session() as session, session.begin():
            session.add(ServerSecretRow(name=name, value=make, created_at=now))
    except IntegrityError:  # another process stored one meanwhile: theirs it is
        pass
    async with db.session() as session:
        stored = await session.scalar(query)
    assert stored is not None
    return stored
