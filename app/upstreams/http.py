"""The upstream HTTP client.

The transport is aiohttp's client: on this machine it relayed ~6,400 requests/s where httpx's
default transport managed ~725 (see bench/RESULTS.md). Adapters receive the session; only this
module knows how it is built. ``connector`` is the injectable transport (tests and benchmarks may
pass their own).

Adapters open their requests with ``send``: what aiohttp refuses to build from an account's
configuration (a base URL or proxy it cannot parse, a header value with a control character, e.g. a
key stored with a newline before such keys were refused) is that account's fault, not the request's:
it becomes ``AuthDead``, so the account is taken out and the request moves to another one.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from app.config import Settings
from app.errors import AuthDead


def create_session(settings: Settings, *, connector: aiohttp.BaseConnector | None = None) -> aiohttp.ClientSession:
    if connector is None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout, sock_read=settings.first_byte_timeout
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        raise_for_status=False,
        skip_auto_headers=("User-Agent",),
        headers={"User-Agent": "kimi-pool/0.1"},
    )


TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, ConnectionError)
"""What a network failure looks like from the client; adapters classify these as ``Transient``."""


async def send(session: aiohttp.ClientSession, method: str, url: str, account: str,
               **options: Any) -> aiohttp.ClientResponse:
    """``session.request(method, url, **options)``: the response (use it as ``async with``), its
    transport errors as they are, and a request aiohttp cannot build from ``account``'s settings as
    ``AuthDead`` (the message says what to fix and quotes none of it: it may hold a secret)."""
    try:
        return await session.request(method, url, **options)
    except aiohttp.InvalidUrlRedirectClientError:
        raise  # the upstream redirected somewhere odd: a transport problem, not the account's
    except aiohttp.InvalidURL:
        raise broken(account, "its base URL or proxy is not a URL aiohttp can use") from None
    except ValueError:  # aiohttp's own refusal of a header value (a control character in it)
        raise broken(account, "a header made from its key or token has a control character in it") from None


def broken(account: str, what: str) -> AuthDead:
    return AuthDead(f"account {account}: its configuration is broken ({what}); fix it with 'kimi-pool accounts "
                    "import' or the admin API, then enable it")
