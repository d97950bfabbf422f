"""What the server says when it starts: a few INFO lines an operator can check at a glance (which
version, which database, which accounts in which state, which models, who may call, where the
dashboard is), and a WARNING with the commands to run when no enabled account could serve anything.
Said once, by the process that holds the pool (the keeper of ``serve --workers N``)."""

from __future__ import annotations

import ipaddress
import logging

from app import __version__
from app.api.auth import Authenticator
from app.config import DEFAULT_DB_URL, Settings
from app.pool.account import State
from app.pool.census import by_kind, named
from app.pool.scheduler import Pool

log = logging.getLogger("kimi_pool")


def base_url(host: str, port: int) -> str:
    """The gateway's URL as a browser on this or another machine would open it."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        return f"http://<this host>:{port}"
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


def summary(settings: Settings, database: str, pool: Pool, auth: Authenticator) -> list[tuple[int, str]]:
    """The lines (level, text) of the start summary; ``database`` is where the database is
    (``Database.where``: a path, or the URL with any password masked)."""
    url = base_url(settings.host, settings.port)
    workers = f" with {settings.workers} workers" if settings.workers > 1 else ""
    lines = [(logging.INFO, f"kimi-pool {__version__} serving {url}{workers}; database {database}")]
    accounts = pool.accounts.values()
    if accounts:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(by_kind(pool).items()))
        states = []
        for state in State:
            names = sorted(account.name for account in accounts if account.state is state)
            if names:
                shown = "" if state is State.ACTIVE else f" ({named(set(names))})"
                states.append(f"{len(names)} {state.value}{shown}")
        lines.append((logging.INFO, f"accounts: {len(accounts)} ({kinds}); {', '.join(states)}"))
    else:
        lines.append((logging.INFO, "accounts: none"))
    served = pool.models()
    lines.append((logging.INFO, f"models served: {named(served) if served else 'none'}"))
    if auth.open:
        access = "open: no master key and no client key, so it answers on loopback only"
    else:
        keys = auth.client_keys
        access = (f"keyed: {'the master key' if settings.master_key else 'no master key'} and {keys} client "
                  f"key{'' if keys == 1 else 's'}")
    dashboard = (f"{url}/dashboard" if settings.master_key
                 else f"{url}/dashboard (it needs the master key: set KIMI_POOL_MASTER_KEY)")
    lines.append((logging.INFO, f"gateway {access}; dashboard {dashboard}"))
    if not any(account.state is not State.DISABLED for account in accounts):
        db = "" if settings.db_url == DEFAULT_DB_URL else " --db URL"
        what = "no accounts" if not accounts else "no enabled account"
        lines.append((logging.WARNING,
                      f"{what}: every request will fail until one is "
                      + ("added" if not accounts else "enabled or added")
                      + f": kimi-pool{db} accounts add NAME --kind moonshot --api-key env:VAR (or --kind kimi-web "
                      f"--token …, or --kind kimi-ai-chat), or kimi-pool{db} accounts import FILE"
                      + (f", or kimi-pool{db} accounts enable NAME" if accounts else "")
                      + "; this server takes it up within seconds"))
    return lines


def log_summary(settings: Settings, database: str, pool: Pool, auth: Authenticator) -> None:
    for level, line in summary(settings, database, pool, auth):
        log.log(level, "%s", line)
