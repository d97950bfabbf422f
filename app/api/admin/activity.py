"""What the pool has been doing: ``/admin/usage`` (the report of ``kimi-pool usage``) and
``/admin/events`` (accounts' state transitions, latest first: the dashboard's "recent errors").

Both see the server's latest requests and transitions at once: reads flush the write-behind queue.
"""

from __future__ import annotations

from typing import Any, cast, get_args

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from app.api.admin.base import admin_of, listing, query, reply, whole
from app.errors import InvalidRequest
from app.store.repository import HealthRepository
from app.store.usage import UsageGroup, UsageLine, UsageRepository
from app.views import event_view, usage_numbers
from app.when import WHEN_HELP, parse_when, utc

_GROUPS: tuple[str, ...] = get_args(UsageGroup)


async def usage_report(request: Request) -> Response:
    """``?since=24h&until=…&by=account|key|model|day``: one row per group and the total, as
    ``kimi-pool usage --json`` prints it."""
    admin = admin_of(request)
    params = query(request, ("since", "until", "by"))
    now = admin.gateway.clock.time()
    start = _when(params.get("since", "24h"), now, "since")
    end = now if params.get("until") is None else _when(params["until"], now, "until")
    if start >= end:
        raise InvalidRequest(f"'since' ({utc(start)}) must be before 'until' ({utc(end)}).", param="since")
    by = params.get("by", "account")
    if by not in _GROUPS:
        raise InvalidRequest(f"'by' must be one of {', '.join(_GROUPS)}, not {by!r}.", param="by")
    group = cast(UsageGroup, by)

    async def report(session: AsyncSession, _now: float) -> list[UsageLine]:
        return await UsageRepository(session).report(start, end, group)

    lines = await admin.read(report)
    return reply({"since": start, "until": end, "by": by,
                  "rows": [{by: line.group, **usage_numbers(line)} for line in lines],
                  "total": usage_numbers(UsageLine.total(lines))})


async def list_events(request: Request) -> Response:
    """``?account=NAME&limit=50``: accounts' state transitions (cooling down, out of quota, dead,
    back to active), the latest first, each with its reason."""
    params = query(request, ("account", "limit"))
    account, limit = params.get("account") or None, whole(params, "limit", 50)

    async def views(session: AsyncSession, _now: float) -> list[dict[str, Any]]:
        return [event_view(row) for row in await HealthRepository(session).recent(limit, account)]

    return listing(await admin_of(request).read(views))


def _when(text: str, now: float, param: str) -> float:
    try:
        return parse_when(text, now)
    except ValueError:
        raise InvalidRequest(f"bad '{param}' {text!r}: use {WHEN_HELP}.", param=param) from None
