"""The rules of an open gateway: with no master key and no client key, only loopback may use it.

An open gateway listens on loopback only (``Settings`` refuses anything else), but that alone does not
keep it private: any web page the operator visits could post to ``http://127.0.0.1:8088`` and spend
the pool, and a DNS-rebinding host name (``evil.example`` resolving to 127.0.0.1) could even read the
answers. So while the gateway is open, every request must name a loopback host (``Host``: localhost,
127.0.0.0/8 or [::1], any port), and a browser's cross-origin request (one with ``Origin``) must come
from a loopback page (a request with no ``Host`` at all, HTTP/1.0, never comes from a browser and
passes). Anything else gets a 403 saying why and what to do. With a key configured,
these rules are off: keys decide, and CORS stays open to every origin.

The outermost apps (``FrontDoor``, a worker's ``WorkerFront``) ask ``turned_away`` only while
``Authenticator.open`` is true, so a gateway with keys pays one attribute read per request.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Scope

from app.api.errors import error_response, header
from app.api.ids import Ids
from app.config import is_loopback
from app.errors import PermissionDenied

_FIX = ("set a key (KIMI_POOL_MASTER_KEY, or create one with 'kimi-pool keys create NAME') "
        "to let other names and origins in")


class HostNotAllowed(PermissionDenied):
    code = "host_not_allowed"


class OriginNotAllowed(PermissionDenied):
    code = "origin_not_allowed"


def loopback_authority(value: str) -> bool:
    """Whether ``host[:port]`` (a ``Host`` header, or an origin after its scheme) names loopback."""
    if value.startswith("["):
        host, bracket, port = value[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        port = port[1:]
    else:
        host, _colon, port = value.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return False
    return is_loopback(host)


def loopback_origin(origin: str) -> bool:
    """Whether a browser's ``Origin`` is a loopback page: ``http(s)://localhost|127.x|[::1][:port]``."""
    scheme, sep, authority = origin.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https") and loopback_authority(authority)


def refusal(scope: Scope) -> PermissionDenied | None:
    """Why an open gateway turns this request away (None: it may pass)."""
    host = origin = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
        elif name == b"origin":
            origin = value
    if host is not None and not loopback_authority(host.decode("latin-1")):
        return HostNotAllowed(
            f"This gateway has no API key, so it answers only to loopback names (localhost, 127.0.0.1, [::1]), "
            f"not to {_shown(host)}: use http://127.0.0.1:<port>, or {_FIX}.")
    if origin is not None and not loopback_origin(origin.decode("latin-1")):
        return OriginNotAllowed(
            f"This gateway has no API key, so browsers may call it only from loopback pages "
            f"(http://localhost…, http://127.0.0.1…, http://[::1]…), not from {_shown(origin)}: {_FIX}.")
    return None


def turned_away(scope: Scope, ids: Ids) -> Response | None:
    """The 403 (an error object of the request's protocol, with its request id) for a request an open
    gateway refuses; None if it may pass."""
    error = refusal(scope)
    if error is None:
        return None
    request_id = ids.request_id(header(scope, b"x-request-id"))
    scope.setdefault("state", {})["request_id"] = request_id
    response = error_response(error, scope)
    response.headers["x-request-id"] = request_id
    return response


def _shown(value: bytes) -> str:
    return repr(value[:100].decode("latin-1"))
