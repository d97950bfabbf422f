"""Who is calling: the master key, a client key (looked up by hash, in memory), or nobody.

Keys are accepted as ``Authorization: Bearer <key>`` or ``X-Api-Key: <key>``. With no master key
and no client keys configured the gateway is open, which ``Settings`` allows on loopback only.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers

from app.errors import AuthenticationFailed, PermissionDenied
from app.store.repository import MASTER_KEY_NAME, hash_key

MASTER = MASTER_KEY_NAME



class Authenticator:
    def __init__(self, master_key: str | None) -> None:
        self._master = master_key
        self._keys: dict[str, str] = {}

    def set_client_keys(self, hashes: dict[str, str]) -> None:
        """Replace the known client keys (SHA-256 hex → key name); called by the store sync."""
        self._keys = dict(hashes)

    @property
    def client_keys(self) -> int:
        """How many client keys are known (not revoked)."""
        return len(self._keys)

    @property
    def open(self) -> bool:
        return self._master is None and not self._keys

    def authenticate(self, headers: Headers) -> str | None:
        """The caller's key name (``master`` for the master key), None on an open gateway."""
        key = _presented_key(headers)
        if key is None:
            if self.open:
                return None
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
        if self._master is not None and _same(key, self._master):
            return MASTER
        name = self._keys.get(hash_key(key))
        if name is not None:
            return name
        if self.open:
            return None
        raise AuthenticationFailed("Incorrect API key provided.")

    def knows(self, headers: Headers) -> bool:
        """Whether ``authenticate`` would let these headers through."""
        try:
            self.authenticate(headers)
        except AuthenticationFailed:
            return False
        return True

    def require_admin(self, headers: Headers) -> None:
        """Let an admin route through: the master key when one is set, else what the API accepts."""
        if self._master is None:
            self.authenticate(headers)
        elif not self.is_master(headers):
            self.authenticate(headers)  # no key, or one nobody issued: 401
            raise PermissionDenied("This route needs the master key: send 'Authorization: Bearer <master key>'.")

    def is_master(self, headers: Headers) -> bool:
        key = _presented_key(headers)
        if self._master is None:
            return self.open
        return key is not None and _same(key, self._master)


def _same(presented: str, expected: str) -> bool:
    """A constant-time comparison that also takes keys with non-ASCII characters (a header is latin-1),
    which ``hmac.compare_digest`` refuses for ``str``."""
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def _presented_key(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return value.strip() or None
    value = headers.get("x-api-key")
    return value.strip() if value and value.strip() else None
