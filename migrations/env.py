"""Alembic environment for kimi-pool.

Three ways in:

* ``Database.upgrade()`` (``kimi-pool serve`` / ``kimi-pool db upgrade``) hands over an open
  connection in ``config.attributes["connection"]``; no alembic.ini is involved.
* the ``alembic`` command line (``alembic upgrade head``, ``alembic revision --autogenerate``),
  run from the project root with ``alembic.ini``: the URL is ``KIMI_POOL_DB``, else the ini's
  ``sqlalchemy.url``, else the default SQLite file.
* offline (``alembic upgrade head --sql``): renders the SQL without a database.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from app.config import DEFAULT_DB_URL
from app.store.db import Database
from app.store.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return os.environ.get("KIMI_POOL_DB") or config.get_main_option("sqlalchemy.url") or DEFAULT_DB_URL


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    db = Database(_url())
    try:
        async with db.engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await db.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
