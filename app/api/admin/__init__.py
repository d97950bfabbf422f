"""The admin API under ``/admin``: what the CLI does, over HTTP, for the master key only.

The route table is the map; each concept has its module (``admin_accounts``, ``admin_keys``,
``admin_models``, ``admin_sessions``, ``admin_activity``), and ``admin_base`` holds what they share.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.routing import Mount, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.admin.accounts import (
    Account,
    Accounts,
    disable_account,
    enable_account,
    probe_account,
    reset_limits,
)
from app.api.admin.activity import list_events, usage_report
from app.api.admin.base import Admin, authorize
from app.api.admin.keys import Keys, revoke_key
from app.api.admin.models import Alias, list_catalogue
from app.api.admin.sessions import delete_session, list_sessions
from app.api.state import Gateway

__all__ = ["Admin", "admin_routes"]


class AdminGuard:
    """Checks the caller before routing, so that without the master key nothing, not even which paths
    exist, is told."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            gateway: Gateway = scope["app"].state.gateway
            authorize(gateway, Headers(scope=scope))
        await self.app(scope, receive, send)


def admin_routes() -> Mount:
    return Mount("/admin", app=AdminGuard(Router([
        Route("/accounts", Accounts),
        Route("/accounts/{name}", Account),
        Route("/accounts/{name}/disable", disable_account, methods=["POST"]),
        Route("/accounts/{name}/enable", enable_account, methods=["POST"]),
        Route("/accounts/{name}/probe", probe_account, methods=["POST"]),
        Route("/accounts/{name}/reset-limits", reset_limits, methods=["POST"]),
        Route("/keys", Keys),
        Route("/keys/{name}", revoke_key, methods=["DELETE"]),
        Route("/models", list_catalogue, methods=["GET"]),
        Route("/models/{alias:path}", Alias),
        Route("/sessions", list_sessions, methods=["GET"]),
        Route("/sessions/{key:path}", delete_session, methods=["DELETE"]),
        Route("/usage", usage_report, methods=["GET"]),
        Route("/events", list_events, methods=["GET"]),
    ])))
