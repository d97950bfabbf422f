"""The upstream HTTP client.

The transport is aiohttp's client: on this machine it relayed ~6,400 requests/s where httpx's
default transport managed ~725 (see bench/RESULTS.md). Adapters receive the session; only this
module knows how it is built. ``connector`` is the injectable transport (tests and benchmarks may
pass their own).
"""

from __future__ import annotations

import aiohttp

from app.config import Settings


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
