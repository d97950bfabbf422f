"""The database handle: one async engine, a session factory, and the migrations runner.

``Database(url)`` works on SQLite (``sqlite+aiosqlite:///path``) and PostgreSQL
(``postgresql+asyncpg://...``). SQLite gets its parent directory created and, on every new
connection, WAL journaling, ``synchronous=NORMAL``, a 5 s busy timeout, foreign keys and
``secure_delete`` (deleted rows are overwritten, so a removed account's key does not linger in free
pages). Every failure to understand the URL or to reach the database is a one-line ``ConfigError``.

The SQLite file holds account secrets in clear (unless given as ``env:VAR``), so it is created
owner-only (0600; SQLite gives its ``-wal`` and ``-shm`` files the database file's mode), and an
existing one, with its companions, is tightened to 0600 when it is opened. ``scrub`` checkpoints
the WAL and truncates it, for after a secret was removed or replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

import app
from app.config import DEFAULT_DB_URL
from app.errors import ConfigError, NoDatabase

if TYPE_CHECKING:
    from alembic.config import Config

SCHEMA_HEAD = "0007"
"""The newest migration's revision. ``upgrade`` does not load alembic (~11 MB of the server's
memory) when the database is at it already; tests/store/test_db.py keeps it equal to the scripts."""

_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=5000",
    "PRAGMA foreign_keys=ON",
    "PRAGMA secure_delete=ON",
)
PRIVATE = 0o600
"""The mode of the database file and its companions: they hold account secrets."""
COMPANIONS = ("-wal", "-shm", "-journal")

log = logging.getLogger("kimi_pool.store")


def migrations_dir() -> Path:
    """The alembic scripts, next to the ``app`` package (the project is installed editable)."""
    return Path(app.__file__).resolve().parent.parent / "migrations"


class Database:
    def __init__(self, url: str, *, create: bool = True) -> None:
        """``create`` False: a SQLite file that does not exist is ``NoDatabase``, and nothing is created
        (the commands that only read or change what is there; only ``serve`` and ``db upgrade`` create)."""
        self.url = url
        parsed = _parse_url(url)
        self.display_url = parsed.render_as_string(hide_password=True)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.where = _where(parsed)
        """What to call this database in messages: a SQLite file's absolute path, else the URL with any
        password masked."""
        options: dict[str, Any] = {"hide_parameters": True}  # bound values (secrets) stay out of errors
        in_memory = False
        if self.is_sqlite:
            in_memory = _is_memory(parsed)
            if in_memory:  # one shared connection, or every connection would see its own empty database
                options["poolclass"] = StaticPool
        else:
            options["pool_pre_ping"] = True
        try:
            self.engine: AsyncEngine = create_async_engine(parsed, **options)
        except ImportError as exc:
            raise ConfigError(f"the driver for {self.display_url} is not installed: {_reason(exc)}") from None
        except (ArgumentError, NoSuchModuleError) as exc:
            raise ConfigError(f"bad database URL {self.display_url}: {_reason(exc)}") from None
        except SQLAlchemyError as exc:  # e.g. a sync driver: "the asyncio extension requires an async driver"
            raise ConfigError(
                f"bad database URL {self.display_url}: {_reason(exc)} "
                "(use sqlite+aiosqlite:///… or postgresql+asyncpg://…)"
            ) from None
        if self.is_sqlite:
            if not in_memory:  # after the engine: a wrong driver is the first thing to say
                _prepare_sqlite_file(parsed, create)
            event.listen(self.engine.sync_engine, "connect", _sqlite_on_connect)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({self.display_url!r})"

    def session(self) -> AsyncSession:
        """A new session, to be used as ``async with db.session() as s, s.begin(): ...``."""
        return self._sessions()

    async def upgrade(self) -> str | None:
        """Run the migrations up to head (a no-op when already there); return the revision."""
        if await self._at_head():
            return SCHEMA_HEAD
        from alembic.util import CommandError

        config = _alembic_config()
        async with self._connect() as connection:
            try:
                revision = await connection.run_sync(_upgrade_to_head, config)
                await connection.commit()
            except CommandError as exc:
                raise ConfigError(f"cannot migrate {self.display_url}: {_reason(exc)}") from None
            except (SQLAlchemyError, OSError) as exc:
                raise ConfigError(f"migrating {self.display_url} failed: {_reason(exc)}") from None
        return revision

    async def _at_head(self) -> bool:
        async with self._connect() as connection:
            try:
                found = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
            except SQLAlchemyError:
                return False  # no table yet: a new database
        return found == [SCHEMA_HEAD]

    async def exists(self) -> bool:
        """Whether kimi-pool's tables are there (at any schema revision)."""
        async with self._connect() as connection:
            try:
                found = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
            except SQLAlchemyError:
                return False
        return bool(found)

    async def current_revision(self) -> str | None:
        """The schema revision the database is at (``None`` for an empty database)."""
        async with self._connect() as connection:
            try:
                return await connection.run_sync(_current_revision)
            except SQLAlchemyError as exc:
                raise ConfigError(f"cannot read {self.display_url}: {_reason(exc)}") from None

    async def scrub(self) -> bool:
        """Copy the WAL into the database and truncate it (SQLite; elsewhere a no-op), so that what was
        deleted or overwritten (with ``secure_delete``, zeroed in the database) is gone from the files
        too. False if a reader kept the checkpoint from finishing; the next one will."""
        if not self.is_sqlite:
            return True
        async with self._connect() as connection:
            busy = (await connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))).first()
        return busy is None or not busy[0]

    async def dispose(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        try:
            connection = await self.engine.connect()
        except (SQLAlchemyError, OSError) as exc:
            raise ConfigError(f"cannot open database {self.display_url}: {_reason(exc)}") from None
        try:
            yield connection
        finally:
            await connection.close()


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"bad database URL {url!r}: expected e.g. {DEFAULT_DB_URL}") from None


def where_of(url: str) -> str:
    """What to call the database at ``url`` in messages (``Database.where``), without opening it."""
    return _where(_parse_url(url))


def _where(url: URL) -> str:
    database = url.database or ""
    if (url.get_backend_name() != "sqlite" or database in ("", ":memory:") or url.query.get("mode") == "memory"
            or database.startswith("file:")):
        return url.render_as_string(hide_password=True)
    return str(Path(database).expanduser().absolute())


def _is_memory(url: URL) -> bool:
    return (url.database or "") in ("", ":memory:") or url.query.get("mode") == "memory"


def _prepare_sqlite_file(url: URL, create: bool) -> None:
    """Create the database file's directory, and the file itself owner-only (or tighten an existing
    one and its companions to owner-only). ``create`` False: a missing file is ``NoDatabase``."""
    database = url.database or ""
    if database.startswith("file:"):  # a URI filename: leave it to SQLite
        return
    path = Path(database).expanduser()
    if not create and not path.exists():
        raise NoDatabase(f"no database at {path.absolute()}")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the database directory {path.parent}: {exc.strerror or exc}") from None
    _make_private(path)


def _make_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it is missing (an empty file is an empty SQLite
    database); else take group and other permissions off it and off its ``-wal``/``-shm``/``-journal``."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE))
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the database {path}: {exc.strerror or exc}") from None
    for each in (path, *(path.with_name(path.name + suffix) for suffix in COMPANIONS)):
        try:
            mode = stat.S_IMODE(each.stat().st_mode)
            if mode & 0o077 and each.is_file():
                each.chmod(mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as exc:  # not ours to change: serve anyway, but say so
            log.warning("%s is readable by other users and cannot be made private: %s", each, exc.strerror or exc)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _alembic_config() -> Config:
    from alembic.config import Config

    location = migrations_dir()
    if not (location / "env.py").is_file():
        raise ConfigError(f"migrations not found at {location} (install kimi-pool with 'pip install -e .')")
    config = Config()
    config.set_main_option("script_location", str(location).replace("%", "%%"))
    return config


def _upgrade_to_head(connection: Connection, config: Config) -> str | None:
    from alembic import command

    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    return _current_revision(connection)


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _reason(exc: BaseException) -> str:
    """The first line of what went wrong, from the driver's error where there is one."""
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    text = str(source).strip() or type(source).__name__
    return text.splitlines()[0]
