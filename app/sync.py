"""Keeps the running pool in step with the accounts table and the client keys.

The CLI and the admin API write the database; the server reads it back every ``interval``
seconds (one cheap query), so an operator's ``accounts disable`` reaches traffic within seconds
without a restart. Account rows whose ``config_rev`` did not change are left alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.accounts_config import resolve_secret
from app.api.auth import Authenticator
from app.catalogue import Catalogue
from app.clock import Clock
from app.errors import ConfigError
from app.kimi_auth import check_fresh, read_token
from app.pool.account import Account, State
from app.pool.scheduler import Pool
from app.redact import redact
from app.store.db import Database
from app.store.models import AccountRow
from app.store.repository import AccountRepository, AliasRepository, ClientKeyRepository

log = logging.getLogger("kimi_pool.sync")


def account_from_row(row: AccountRow, catalogue: Catalogue | None = None, now: float | None = None) -> Account:
    """The pool's view of a stored account. A secret that cannot be resolved, or a kimi-web token
    that has lapsed (at ``now``), makes it ``auth_dead`` with the reason."""
    spec = AccountRepository.to_spec(row)
    state, reason = State(row.state), row.state_reason
    try:
        secret = resolve_secret(spec.secret)
        if spec.kind == "kimi-web" and secret is not None and now is not None:
            check_fresh(secret, now, spec.name)
    except ConfigError as exc:
        secret, state, reason = None, State.AUTH_DEAD, exc.message
    if not row.enabled:
        state, reason = State.DISABLED, row.disabled_reason
    until = row.state_until if state in (State.COOLING_DOWN, State.QUOTA_EXHAUSTED) else None
    return Account(spec, secret, rev=row.config_rev, state=state, until=until, reason=reason, catalogue=catalogue)


class AccountSync:
    def __init__(self, db: Database, pool: Pool, auth: Authenticator, clock: Clock, *, quiet: bool = False) -> None:
        """``quiet``: log nothing of the accounts (a worker's copy; the keeper logs them)."""
        self._db = db
        self._pool = pool
        self._auth = auth
        self._clock = clock
        self._generation = 0
        self._loaded = asyncio.Condition()
        self._loading = asyncio.Lock()
        self._catalogue: Catalogue | None = None
        self._warned: dict[str, float] = {}  # account → the token expiry it was warned about
        self._listeners: list[Callable[[], None]] = []
        self._quiet = quiet

    def on_load(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every load (the keeper tells its workers to reload too)."""
        self._listeners.append(listener)

    @property
    def generation(self) -> int:
        """How many times the pool has been reloaded from the database."""
        return self._generation

    async def load(self) -> None:
        """Bring the pool and the client keys in line with the database. Loads run one at a time, so an
        older read (the periodic tick) can never land after a newer one (an admin API write)."""
        async with self._loading:
            await self._load()

    async def _load(self) -> None:
        async with self._db.session() as session:
            rows = await AccountRepository(session).list()
            hashes = await ClientKeyRepository(session).active_hashes()
            catalogue = Catalogue.with_overrides(await AliasRepository(session).list())
        rebuild = catalogue != self._catalogue
        if rebuild and self._catalogue is not None and not self._quiet:
            log.info("model aliases changed: %s", ", ".join(sorted(catalogue.aliases)) or "none")
        self._catalogue = catalogue
        now = self._clock.time()
        seen = set()
        for row in rows:
            seen.add(row.name)
            current = self._pool.accounts.get(row.name)
            if current is None or current.rev != row.config_rev or rebuild:
                account = account_from_row(row, catalogue, now)
                self._pool.put(account)
                if not self._quiet:
                    log.info("account %s loaded (rev %d): %s%s", row.name, row.config_rev, account.state.value,
                             f" ({redact(account.reason)})" if account.reason else "")
            if row.kind == "kimi-web" and not self._quiet:
                self._warn_lapsing(row, now)
        for name in set(self._pool.accounts) - seen:
            self._pool.remove(name)
            if not self._quiet:
                log.info("account %s removed", name)
        self._auth.set_client_keys(hashes)
        async with self._loaded:
            self._generation += 1
            self._loaded.notify_all()
        for listener in self._listeners:
            listener()

    def _warn_lapsing(self, row: AccountRow, now: float) -> None:
        """Log once per token when a kimi-web login is about to lapse (there is no refresh flow)."""
        try:
            info = read_token(resolve_secret(row.secret) or "")
        except ConfigError:
            return
        if info.lapses_soon(now) and self._warned.get(row.name) != info.expires_at:
            self._warned[row.name] = info.expires_at
            log.warning("account %s: its kimi.com login token %s; log in again and update it "
                        "(kimi-pool accounts add/import)", row.name,
                        "has expired" if info.expired(now) else f"expires {info.describe(now)}")
        elif not info.lapses_soon(now) and self._warned.pop(row.name, None) is not None:
            log.info("account %s: its kimi.com login token was replaced; the new one expires %s", row.name,
                     info.describe(now))

    async def wait_generation(self, generation: int) -> None:
        """Return once the pool has been reloaded at least ``generation`` times."""
        async with self._loaded:
            await self._loaded.wait_for(lambda: self._generation >= generation)

    async def run(self, interval: float) -> None:
        while True:
            await self._clock.sleep(interval)
            try:
                await self.load()
            except Exception:
                log.exception("reloading accounts from the database failed; will try again")
