"""Telling a running server that shares the database to reload it, at once.

The CLI writes the database, then calls ``tell_server(db_url)``: for a SQLite file it connects to
the Unix socket the server listens on beside that file (``socket_path``), sends ``reload`` and
waits for ``ok``, which the server sends once its pool and client keys — and, with ``--workers``,
every worker's — are reloaded. So a key revoked with the CLI is refused from the very next request,
whichever process serves it. With no server there is nothing to tell and nothing goes wrong (no
socket, or a stale one a killed server left). Other databases (PostgreSQL) have no socket: a server
picks CLI changes up within its sync interval.

The server creates the socket 0600, so only its own user (and root) may connect. Its path is the
database file's with ``.sock`` appended, or, when that is too long for a Unix socket, a name
derived from the file's real path in a private directory (0700) under the temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

log = logging.getLogger("kimi_pool.notify")

MAX_PATH = 100
"""Longest socket path used as it is (the kernel's limit is 107 bytes)."""
TIMEOUT = 10.0
"""How long the CLI waits for the server's ``ok``."""
_REQUEST, _OK = b"reload\n", b"ok\n"


def database_file(db_url: str) -> Path | None:
    """The SQLite file of ``db_url``, resolved; None for another database or an in-memory one."""
    try:
        url = make_url(db_url)
    except (ArgumentError, ValueError):
        return None
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:") \
            or url.query.get("mode") == "memory":
        return None
    return Path(os.path.realpath(Path(database).expanduser()))


def socket_path(db_url: str) -> Path | None:
    """Where a server on ``db_url`` listens for reload requests; None when it does not (not SQLite)."""
    database = database_file(db_url)
    if database is None:
        return None
    beside = database.with_name(database.name + ".sock")
    if len(os.fsencode(beside)) <= MAX_PATH:
        return beside
    digest = hashlib.sha256(os.fsencode(database)).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / f"kimi-pool-{os.getuid()}" / f"{digest}.sock"


# --- the CLI's side --------------------------------------------------------------------------------


async def tell_server(db_url: str, *, timeout: float = TIMEOUT) -> str | None:
    """Ask a server running on ``db_url`` to reload now and wait until it has. None when it has, or
    when no server listens; otherwise a sentence saying why it could not be told (for a warning)."""
    path = socket_path(db_url)
    if path is None:
        return None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(_REQUEST)
                await writer.drain()
                answer = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # no server, or one that was killed and left its socket behind
    except TimeoutError:
        return f"the running server did not confirm the change within {timeout:g} s"
    except OSError as exc:
        return f"cannot reach the running server at {path}: {exc.strerror or exc}"
    if answer != _OK:
        return "the running server could not reload"
    return None


# --- the server's side -----------------------------------------------------------------------------


class ReloadSocket:
    """Listens on ``socket_path(db_url)`` and answers each ``reload`` once ``on_reload()`` returns."""

    def __init__(self, on_reload: Callable[[], Awaitable[None]]) -> None:
        self._on_reload = on_reload
        self._server: asyncio.AbstractServer | None = None
        self._path: Path | None = None
        self._inode: int | None = None

    @property
    def path(self) -> Path | None:
        """Where it listens; None when it does not."""
        return self._path

    async def start(self, db_url: str) -> Path | None:
        """Listen, if ``db_url`` is a SQLite file and no other server listens for it already."""
        path, database = socket_path(db_url), database_file(db_url)
        if path is None or database is None:
            return None
        try:
            if (path.parent != database.parent and not _private_dir(path.parent)) or not await _free(path):
                return None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(os.fspath(path))
                os.chmod(path, 0o600)
                sock.listen(64)
            except BaseException:
                sock.close()
                raise
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except OSError as exc:
            log.warning("cannot listen at %s for the CLI's changes (%s); they reach this server within its sync "
                        "interval", path, exc.strerror or exc)
            return None
        self._path, self._inode = path, os.stat(path).st_ino
        return path

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        with contextlib.suppress(OSError):
            if self._path is not None and os.stat(self._path).st_ino == self._inode:  # not a successor's
                os.unlink(self._path)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                request = await reader.readline()
            if request == _REQUEST:
                await self._on_reload()
                writer.write(_OK)
            else:
                writer.write(b"error: unknown request\n")
            await writer.drain()
        except Exception as exc:  # a reload that failed, a client that left: the CLI says so
            log.warning("a reload asked for by the CLI failed: %s", exc)
        finally:
            writer.close()


async def _free(path: Path) -> bool:
    """Whether ``path`` is free to listen on: absent, or a socket nobody listens on (a killed server's,
    which is removed). False when another server listens there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return True
    if not stat.S_ISSOCK(mode):
        log.warning("%s exists and is not a socket; the CLI's changes reach this server within its sync interval",
                    path)
        return False
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    writer.close()
    log.warning("another server listens at %s (on the same database): the CLI tells it, and this one picks "
                "changes up within its sync interval", path)
    return False


def _private_dir(directory: Path) -> bool:
    """Make sure the fallback directory is this user's and private (0700), creating it if need be."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        log.warning("%s is not a private directory of this user; the CLI's changes reach this server within its "
                    "sync interval", directory)
        return False
    return True
