"""The operator's dashboard.

``GET /dashboard`` is the page shell: HTML with no data and no secret in it. The page asks for the
master key, keeps it in the tab's ``sessionStorage`` and sends it with every fetch of the data:
``/v1/pool/status``, the admin API and two admin routes here that only the dashboard needs,
``GET /admin/usage/series`` (requests and tokens over time, per account, client key or model) and
``GET /admin/usage/errors`` (the latest failed requests). Its files are served from ``app/static``
under ``/dashboard/assets/``, so it works with no internet access; their URLs carry a hash of the
files, which lets browsers cache them for a year.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from app.api.admin.base import admin_of, authorize, listing, query, reply, whole
from app.api.state import Gateway
from app.errors import InvalidRequest, NotFound
from app.pool.limits import DAY, next_day
from app.store.models import UsageRow
from app.store.usage import SeriesGroup, SeriesPoint, UsageLine, UsageRepository
from app.when import duration_seconds

STATIC = Path(__file__).resolve().parents[2] / "static"
PAGE = "dashboard.html"
VERSION_MARK = "{{version}}"
"""Replaced in the page by the assets' hash, which their URLs carry as ``?v=``."""
LONG_CACHE = "public, max-age=31536000, immutable"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8", "": "text/plain; charset=utf-8"}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    # Everything comes from here; nothing inline, nothing evaluated, no framing (the page has buttons
    # that disable accounts), nothing sent elsewhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

SERIES_SINCE = 3600
SINCE_MAX = 31 * 86400
MAX_BUCKETS = 1440
NICE_STEPS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
DEFAULT_BUCKETS = 120
"""Without ``step``, the series has about this many buckets (the smallest of ``NICE_STEPS`` that fits)."""
ERRORS_SINCE, ERRORS_DEFAULT, ERRORS_MAX = 86400, 20, 200
_GROUPS: tuple[SeriesGroup, ...] = ("account", "key", "model")


class Dashboard:
    """The page and its assets, read from ``static`` (``app/static``)."""

    def __init__(self, static: Path = STATIC) -> None:
        self._static = static.resolve()
        self._page: tuple[str, bytes] | None = None  # (version, page), read on first use

    def routes(self) -> list[Route]:
        return [
            Route("/dashboard", self.page, methods=["GET"]),
            Route("/dashboard/assets/{file:path}", self.asset, methods=["GET"]),
            Route("/admin/usage/series", usage_series, methods=["GET"]),
            Route("/admin/usage/errors", usage_errors, methods=["GET"]),
        ]

    async def page(self, request: Request) -> Response:
        _version, page = await self._load()
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def asset(self, request: Request) -> Response:
        """A file of ``static``. Not the page (only ``/dashboard`` serves it, with its CSP and frame
        protection), nothing outside ``static``, no hidden file; a name the file system cannot take
        (a NUL, a name too long) is simply not there."""
        unknown = NotFound(f"Unknown path: {request.method} {request.url.path}")
        try:
            path = (self._static / request.path_params["file"]).resolve()
            if (not path.is_relative_to(self._static) or path.name.startswith(".") or path.suffix == ".html"
                    or not path.is_file()):
                raise unknown
        except (ValueError, OSError):
            raise unknown from None
        version, _page = await self._load()
        # a URL with the current hash names these exact bytes for good; any other may change under it
        cache = LONG_CACHE if request.query_params.get("v") == version else "no-cache"
        return FileResponse(path, media_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
                            headers={"Cache-Control": cache, "X-Content-Type-Options": "nosniff"})

    async def _load(self) -> tuple[str, bytes]:
        if self._page is None:
            self._page = await anyio.to_thread.run_sync(self._read)
        return self._page

    def _read(self) -> tuple[str, bytes]:
        digest = hashlib.sha256()
        for path in sorted(p for p in self._static.rglob("*") if p.is_file()):
            digest.update(path.relative_to(self._static).as_posix().encode() + b"\0" + path.read_bytes())
        version = digest.hexdigest()[:12]
        page = (self._static / PAGE).read_text(encoding="utf-8").replace(VERSION_MARK, version)
        return version, page.encode("utf-8")


async def usage_series(request: Request) -> Response:
    """``GET /admin/usage/series?since=1h&step=60&by=account``: requests, errors and tokens per
    ``step`` seconds over the last ``since`` (``90s``, ``15m``, ``1h``, ``7d`` or seconds), one series
    per account, client key name or model; every bucket present (zeros where nothing happened), the
    buckets aligned on multiples of ``step``, the last one still filling. Also each group's total
    today, since midnight UTC+8, when Moonshot's daily token quotas roll over."""
    gateway: Gateway = request.app.state.gateway
    authorize(gateway, request.headers)
    params = query(request, ("since", "step", "by"))
    since = _since(params, SERIES_SINCE)
    step = _step(params.get("step"), since)
    by = params.get("by", "account")
    if by not in _GROUPS:
        raise InvalidRequest(f"'by' must be one of {', '.join(_GROUPS)}, not {by!r}.", param="by")
    group = cast(SeriesGroup, by)
    now = gateway.clock.time()
    last = math.floor(now / step) * step
    first = min(math.floor((now - since) / step) * step, last - step)
    times = list(range(first, last + step, step))
    day = next_day(now) - DAY

    async def read(session: AsyncSession, _now: float) -> tuple[list[SeriesPoint], list[UsageLine]]:
        usage = UsageRepository(session)
        return await usage.series(first, last + step, step, group), await usage.report(day, day + DAY, group)

    points, today = await admin_of(request).read(read)
    index = {t: i for i, t in enumerate(times)}
    series: dict[str | None, dict[str, list[int]]] = {}
    for start, line in points:
        numbers = series.setdefault(line.group, {name: [0] * len(times) for name in ("requests", "errors", "tokens")})
        i = index[start]
        numbers["requests"][i] += line.requests
        numbers["errors"][i] += line.errors
        numbers["tokens"][i] += line.total_tokens
    ordered = sorted(series.items(), key=lambda item: (-sum(item[1]["requests"]), item[0] is None, item[0] or ""))
    body = {
        "now": now, "since": first, "until": last + step, "step": step, "by": by, "t": times,
        "series": [{"name": name, **numbers} for name, numbers in ordered],
        "today": {"since": day, "rows": [{"name": line.group, **_numbers(line)} for line in today]},
    }
    return reply(body)


async def usage_errors(request: Request) -> Response:
    """``GET /admin/usage/errors?since=24h&limit=20``: the latest requests of the last ``since`` that
    did not end with status 200, latest first."""
    gateway: Gateway = request.app.state.gateway
    authorize(gateway, request.headers)
    params = query(request, ("since", "limit"))
    since = _since(params, ERRORS_SINCE)
    limit = whole(params, "limit", ERRORS_DEFAULT, maximum=ERRORS_MAX)
    start = gateway.clock.time() - since
    rows = await admin_of(request).read(lambda session, _now: UsageRepository(session).failures(start, limit))
    return listing([_failure(row) for row in rows])


def _since(params: Mapping[str, str], default: int) -> int:
    since = _duration(params.get("since"), "since", default)
    if not 1 <= since <= SINCE_MAX:
        raise InvalidRequest(f"'since' must be from 1 s to {SINCE_MAX // 86400} days.", param="since")
    return since


def _duration(text: str | None, param: str, default: int) -> int:
    """Whole seconds, at most ``SINCE_MAX`` + 1 (a longer span is refused by the caller, whatever its size)."""
    if text is None:
        return default
    bare = text.strip()
    seconds = duration_seconds(bare if bare[-1:].isalpha() else bare + "s")  # plain seconds are allowed
    if seconds is None:
        raise InvalidRequest(f"bad '{param}' {text!r}: use seconds, or a number and a unit (s, m, h, d or w) "
                             "such as 15m", param=param)
    return math.ceil(min(seconds, SINCE_MAX + 1))  # also inf, from a number too long for a float


def _step(text: str | None, since: int) -> int:
    if text is None:
        return next((s for s in NICE_STEPS if since / s <= DEFAULT_BUCKETS), NICE_STEPS[-1])
    step = _duration(text, "step", 0)
    if step < 1 or since / step > MAX_BUCKETS or step > SINCE_MAX:
        raise InvalidRequest(f"'step' must be from 1 s to {SINCE_MAX // 86400} days and cut 'since' into at most "
                             f"{MAX_BUCKETS} buckets.", param="step")
    return step


def _numbers(line: UsageLine) -> dict[str, int]:
    return {"requests": line.requests, "errors": line.errors, "tokens": line.total_tokens}


def _failure(row: UsageRow) -> dict[str, Any]:
    return {"ts": row.ts, "request_id": row.request_id, "account": row.account, "key": row.client_key,
            "model": row.model, "stream": row.stream, "status": row.status, "outcome": row.outcome,
            "attempts": row.attempts, "latency_ms": row.latency_ms}
