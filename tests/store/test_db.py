"""Database: a fresh SQLite file migrates to head with WAL on; upgrading again changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, inspect, text

from app.errors import ConfigError
from app.store.db import SCHEMA_HEAD, Database, migrations_dir
from app.store.models import Base

HEAD = SCHEMA_HEAD


def head_revision() -> str | None:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return ScriptDirectory.from_config(config).get_current_head()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/nested/dir/kimi-pool.db")
    yield database
    await database.dispose()


async def test_fresh_file_migrates_to_head(db: Database, tmp_path: Path) -> None:
    assert await db.current_revision() is None
    assert await db.upgrade() == head_revision() == HEAD
    assert (tmp_path / "nested/dir/kimi-pool.db").is_file()
    assert await db.current_revision() == HEAD
    async with db.engine.connect() as conn:
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert tables == {"alembic_version", "accounts", "client_keys", "usage", "health_events", "sessions",
                      "model_aliases", "files", "batches", "batch_items", "idempotency_keys", "server_secrets"}


async def test_every_connection_gets_the_pragmas(db: Database) -> None:
    await db.upgrade()
    async with db.engine.connect() as conn:
        values = {p: (await conn.execute(text(f"PRAGMA {p}"))).scalar()
                  for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "secure_delete")}
    assert values == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 5000, "foreign_keys": 1,
                      "secure_delete": 1}


async def test_second_upgrade_is_a_no_op(db: Database) -> None:
    await db.upgrade()
    async with db.engine.begin() as conn:
        await conn.execute(text("INSERT INTO client_keys (name, key_hash, key_prefix, created_at) "
                                "VALUES ('k', 'h', 'kp-', 1.0)"))
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.strip().split()[0].upper())

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    assert await db.upgrade() == HEAD
    event.remove(db.engine.sync_engine, "before_cursor_execute", record)
    assert statements  # it did look at alembic_version ...
    writes = {"CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE"}
    assert not set(statements) & writes  # ... and changed nothing
    async with db.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM client_keys"))).scalar() == 1


async def test_the_migration_matches_the_models(db: Database) -> None:
    await db.upgrade()
    async with db.engine.connect() as conn:
        diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
    assert diff == []


async def test_sessions_share_the_file(db: Database) -> None:
    await db.upgrade()
    async with db.session() as session, session.begin():
        await session.execute(text("INSERT INTO health_events (ts, account, state) VALUES (1, 'a', 'up')"))
    async with db.session() as session:
        assert (await session.execute(text("SELECT account FROM health_events"))).scalar() == "a"


async def test_in_memory_database_keeps_its_schema() -> None:
    database = Database("sqlite+aiosqlite://")
    try:
        await database.upgrade()
        async with database.session() as session:
            assert (await session.execute(text("SELECT count(*) FROM accounts"))).scalar() == 0
    finally:
        await database.dispose()


@pytest.mark.parametrize(("url", "message"), [
    ("not a url", "bad database URL"),
    ("sqlite:///x.db", "async driver"),
    ("nosuchdb+driver://host/db", "bad database URL"),
])
def test_bad_urls_are_one_line_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Database(url)
    assert "\n" not in info.value.message


async def test_unusable_database_is_a_config_error(tmp_path: Path) -> None:
    not_a_db = tmp_path / "junk.db"
    not_a_db.write_bytes(b"this is not an SQLite file" * 100)
    database = Database(f"sqlite+aiosqlite:///{not_a_db}")
    try:
        with pytest.raises(ConfigError, match=r"cannot open database .*junk\.db: file is not a database"):
            await database.upgrade()
    finally:
        await database.dispose()


async def test_password_is_masked_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        Database("postgresql+nosuchdriver://user:hunter2@db.example/kimi")
    assert "hunter2" not in info.value.message
    assert "user:***@db.example" in info.value.message



async def test_a_database_at_0001_upgrades_and_keeps_its_rows(db: Database) -> None:
    from alembic import command

    def to_0001(connection: Any) -> None:
        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")

    async with db.engine.begin() as conn:
        await conn.run_sync(to_0001)
        await conn.execute(text("INSERT INTO client_keys (name, key_hash, key_prefix, created_at) "
                                "VALUES ('k', 'h', 'kp-', 1.0)"))
    assert await db.current_revision() == "0001"
    assert await db.upgrade() == SCHEMA_HEAD
    async with db.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM client_keys"))).scalar() == 1
        assert (await conn.execute(text("SELECT count(*) FROM sessions"))).scalar() == 0


def test_schema_head_names_the_newest_migration() -> None:
    """``Database.upgrade`` trusts SCHEMA_HEAD to skip loading alembic: it must be the scripts' head."""
    assert head_revision() == SCHEMA_HEAD


# --- files: owner-only, and no removed secret left in them -----------------------------------------


import asyncio  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import stat  # noqa: E402

import httpx  # noqa: E402

from app.cli import run  # noqa: E402
from tests.conftest import MASTER_KEY, reload, run_stack  # noqa: E402

REMOVED_KEY = "sk-RemovedAccountKey0123456789abcdef"


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.name.startswith("kimi-pool.db")}


def stored(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.name.startswith("kimi-pool.db") and p.is_file())


def test_db_upgrade_and_cli_commands_create_the_database_owner_only(tmp_path: Path) -> None:
    fresh = tmp_path / "new"
    assert run(["--db", f"sqlite+aiosqlite:///{fresh}/kimi-pool.db", "db", "upgrade"]) == 0
    assert modes(fresh) == {"kimi-pool.db": 0o600}
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700, "a directory kimi-pool creates is private too"
    assert run(["--db", f"sqlite+aiosqlite:///{fresh}/kimi-pool.db", "keys", "create", "k"]) == 0
    assert modes(fresh) == {"kimi-pool.db": 0o600}


def test_an_existing_world_readable_database_and_its_wal_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "kimi-pool.db"
    holder = sqlite3.connect(path)  # an older kimi-pool's files: 0644, a WAL left beside them
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE t (x)")
    holder.execute("INSERT INTO t VALUES (1)")
    holder.commit()
    for each in tmp_path.iterdir():
        each.chmod(0o644)
    assert set(modes(tmp_path)) == {"kimi-pool.db", "kimi-pool.db-wal", "kimi-pool.db-shm"}
    try:
        assert run(["--db", f"sqlite+aiosqlite:///{path}", "db", "upgrade"]) == 0
    finally:
        holder.close()
    assert set(modes(tmp_path).values()) == {0o600}


async def test_a_running_server_keeps_its_files_owner_only(tmp_path: Path) -> None:
    os.umask(old := os.umask(0o022))  # whatever the umask, as long as it is the usual one
    async with run_stack(tmp_path) as stack, stack.http() as http:
        assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"})).status_code == 200
        await stack.app.state.writer.flush()
        found = modes(tmp_path)
        assert {"kimi-pool.db", "kimi-pool.db-wal", "kimi-pool.db-shm"} <= set(found)
        assert set(found.values()) == {0o600}, found
    os.umask(old)


async def test_a_key_removed_with_the_cli_is_gone_from_the_files_of_a_running_server(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        add = ["--db", stack.db_url, "accounts", "add", "leaving", "--kind", "moonshot", "--api-key", REMOVED_KEY,
               "--base-url", stack.emulator_url + "/v1"]
        assert await asyncio.to_thread(run, add) == 0
        await reload(stack)
        assert "leaving" in stack.gateway.pool.accounts
        assert REMOVED_KEY.encode() in stored(tmp_path)
        assert await asyncio.to_thread(run, ["--db", stack.db_url, "accounts", "remove", "leaving"]) == 0
        assert REMOVED_KEY.encode() not in stored(tmp_path), "secure_delete, and the WAL truncated"
        await reload(stack)
        assert "leaving" not in stack.gateway.pool.accounts


async def test_a_key_removed_through_the_admin_api_is_gone_from_the_files(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, httpx.AsyncClient(
            base_url=stack.url + "/admin", headers={"Authorization": f"Bearer {MASTER_KEY}"}) as admin:
        account = {"name": "leaving", "kind": "moonshot", "api_key": REMOVED_KEY,
                   "base_url": stack.emulator_url + "/v1"}
        assert (await admin.post("/accounts", json=account)).status_code == 201
        replaced = "sk-ReplacedAccountKey0123456789abcdef"
        assert (await admin.patch("/accounts/leaving", json={"api_key": replaced})).status_code == 200
        assert REMOVED_KEY.encode() not in stored(tmp_path), "a replaced key is gone too"
        assert (await admin.delete("/accounts/leaving")).status_code == 200
        assert replaced.encode() not in stored(tmp_path)
