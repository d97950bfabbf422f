"""The ``kimi-auth`` token of a kimi.com web login (PROTOCOLS.md §3.1): read, never verified.

A ``kimi-web`` account's credential is the JWT kimi.com keeps in its ``kimi-auth`` cookie. kimi-pool
cannot check its signature (only kimi.com holds the key) but reads its claims: that it is an access
token of the ``kimi`` app, whose user it names, and when it lapses (30 days after login). There is
no refresh flow: an expired token needs a new login, so kimi-pool refuses expired tokens when an
account is added and warns before one lapses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from app.errors import ConfigError

WARN_BEFORE = 3 * 86_400.0
"""How long before a token lapses the server starts warning about it."""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    user: str
    expires_at: float
    issued_at: float | None
    device_id: str | None = None
    session_id: str | None = None
    """The login's ``ssid``; with ``device_id`` and ``user``, what kimi.com's own client sends as headers."""

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def lapses_soon(self, now: float) -> bool:
        return self.expires_at - now <= WARN_BEFORE

    def describe(self, now: float) -> str:
        """``2026-12-24 08:00 UTC (in 29d)`` — for ``accounts list``."""
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.expires_at))
        left = self.expires_at - now
        if left <= 0:
            return f"{stamp} (expired)"
        if left >= 86_400:
            return f"{stamp} (in {int(left // 86_400)}d)"
        return f"{stamp} (in {max(1, int(left // 3600))}h)"


def read_token(token: str) -> TokenInfo:
    """The claims of a kimi-auth token; ``ConfigError`` (one line, no token in it) if it is not one."""
    import jwt  # loaded only where kimi-web tokens are read

    try:
        claims: Any = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except jwt.PyJWTError:
        raise ConfigError("the kimi-web token is not a JWT (copy the kimi-auth cookie of kimi.com)") from None
    if not isinstance(claims, dict):
        raise ConfigError("the kimi-web token's payload is not a JSON object")
    if claims.get("app_id") != "kimi" or claims.get("typ") != "access":
        raise ConfigError("the kimi-web token is not a kimi.com access token (expected app_id 'kimi', typ 'access'; "
                          "legacy refresh tokens are not supported)")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise ConfigError("the kimi-web token has no expiry (exp claim)")
    iat = claims.get("iat")
    issued = float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else None
    device, ssid = claims.get("device_id"), claims.get("ssid")
    return TokenInfo(user=str(claims.get("sub") or "?"), expires_at=float(exp), issued_at=issued,
                     device_id=str(device) if device else None, session_id=str(ssid) if ssid else None)


def check_fresh(token: str, now: float, account: str) -> TokenInfo:
    """Refuse a token that has already lapsed, naming the account and when it did."""
    info = read_token(token)
    if info.expired(now):
        raise ConfigError(f"account {account}: the kimi-web token expired on {info.describe(now).split(' (')[0]}; "
                          "log in to kimi.com again and copy the new kimi-auth cookie")
    return info
