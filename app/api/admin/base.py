"""What every admin endpoint shares: its state (``Admin``), who may call it, and strict JSON in and out.

The admin API is the master key's alone: a client key gets 403, no key or a wrong one 401, and
with no master key configured it is refused whatever is sent, so it is never open. Every read
first flushes the write-behind queue, so it sees what the running server has done (a cooldown a
second ago, the last request's usage); every write runs in one transaction and then reloads the
pool and every worker (``reload``), so the change serves traffic before the response is sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from app.api.body import read_body
from app.api.openai.schema import parse_json
from app.api.state import Gateway
from app.discovery import ModelDiscovery
from app.errors import ConfigError, InvalidRequest, NotFound, PermissionDenied
from app.store.db import Database
from app.store.models import AccountRow
from app.store.repository import AccountRepository
from app.store.states import StateWriter
from app.store.writer import WriteBehind
from app.upstreams.registry import Registry

MAX_BODY_BYTES = 1024 * 1024
"""Admin requests are small; a bigger body is refused (413) before it is read."""
MAX_LIMIT = 1000
"""The most rows one listing returns (``?limit=``)."""

_T = TypeVar("_T")
Work = Callable[[AsyncSession, float], Awaitable[_T]]


@dataclass(frozen=True, slots=True)
class Admin:
    """What the admin API works with (``app.state.admin``), built by ``main``'s lifespan."""

    gateway: Gateway
    db: Database
    registry: Registry
    writer: WriteBehind
    states: StateWriter
    reload: Callable[[], Awaitable[None]]
    """Reload the pool, the client keys and every worker from the database (``main``)."""
    discovery: ModelDiscovery

    async def read(self, work: Work[_T]) -> _T:
        """Run ``work(session, now)`` on the database, after writing out what the server has queued."""
        await self.writer.flush()
        async with self.db.session() as session:
            return await work(session, self.gateway.clock.time())

    async def write(self, work: Work[_T], *, reload: bool = True, scrub: bool = False) -> _T:
        """Run ``work(session, now)`` in one transaction, then (``reload``) bring the pool in line with it.

        The queue is flushed and the account states the server is writing are stored first, so the
        runtime state stored with an account is current when the pool rebuilds that account from its
        row. ``scrub``: the work removed or replaced a secret; truncate the WAL afterwards
        (``Database.scrub``)."""
        await self.writer.flush()
        await self.states.saved()
        async with self.db.session() as session, session.begin():
            result = await work(session, self.gateway.clock.time())
        if scrub:
            await self.db.scrub()
        if reload:
            await self.reload()
        return result


def admin_of(request: Request) -> Admin:
    admin: Admin = request.app.state.admin
    return admin


def authorize(gateway: Gateway, headers: Headers) -> None:
    """Let the master key through; anything else raises (403 or 401)."""
    if gateway.settings.master_key is None:
        raise PermissionDenied("The admin API is off because no master key is set: set KIMI_POOL_MASTER_KEY "
                               "(or API_MASTER_KEY) and restart kimi-pool.", code="admin_api_disabled")
    if gateway.auth.is_master(headers):
        return
    gateway.auth.authenticate(headers)  # no key, or one nobody issued: 401
    raise PermissionDenied("This key may not use the admin API: it takes the master key.")


# --- JSON in ----------------------------------------------------------------------------------------


async def json_body(request: Request, allowed: Iterable[str], *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object, with no fields but ``allowed``; with ``optional``, no body is ``{}``."""
    declared = request.headers.get("content-length")
    raw = await read_body(request.receive, None if declared is None else declared.encode("latin-1"), MAX_BODY_BYTES)
    if optional and not raw.strip():
        return {}
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    _only(body, allowed, "field")
    return body


def query(request: Request, allowed: Iterable[str]) -> Mapping[str, str]:
    """The query parameters, with none but ``allowed``."""
    params = request.query_params
    _only(params, allowed, "query parameter")
    return params


def whole(params: Mapping[str, str], name: str, default: int, *, maximum: int = MAX_LIMIT) -> int:
    text = params.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= maximum:
        raise InvalidRequest(f"'{name}' must be a whole number from 1 to {maximum}, not {text!r}.", param=name)
    return int(text)


def text(body: Mapping[str, Any], name: str) -> str | None:
    """An optional non-empty string field."""
    value = body.get(name)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise InvalidRequest(f"'{name}' must be a non-empty string.", param=name)
    return value


def _only(fields: Iterable[str], allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        expected = f" (expected {', '.join(allowed)})" if allowed else " (expected none)"
        raise InvalidRequest(f"unknown {what}(s): {', '.join(unknown)}{expected}", param=unknown[0])


# --- JSON out ---------------------------------------------------------------------------------------


def reply(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def listing(items: list[Any]) -> Response:
    return reply({"object": "list", "data": items})


async def find_account(session: AsyncSession, name: str) -> AccountRow:
    """The account's row; 404 if there is none."""
    try:
        return await AccountRepository(session).get(name)
    except ConfigError as exc:
        raise NotFound(exc.message) from None
