"""Keeps the running pool in step with the accounts table and the client keys.

The CLI and the admin API write the database, then tell a running server to reload at once (the
admin API calls ``load``; the CLI, over ``app.notify``'s socket); the server also reads it back
every ``interval`` seconds (one cheap query), for writers that cannot tell it. Account rows whose
``config_rev`` and discovered models (``app.discovery``) did not change are left alone. A reloaded
account takes the runtime state of its row, unless the server has a newer one of its own that is still
being written (``unsaved``) and the row holds what the server last stored: then the pool's stands. An
account whose credential this process cannot load (an ``env:VAR`` it does not have, a lapsed token) is
``auth_dead``; the sync says so in a WARNING and stores the reason with the account (``load_error``) for
``accounts list`` and the admin API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from app.accounts_config import resolve_secret
from app.api.auth import Authenticator
from app.catalogue import Catalogue
from app.clock import Clock
from app.errors import ConfigError
from app.kimi_auth import check_fresh, read_token
from app.pool.account import Account, Runtime, State
from app.pool.scheduler import Pool
from app.redact import redact
from app.store.db import Database
from app.store.models import AccountRow
from app.store.repository import AccountRepository, AliasRepository, ClientKeyRepository

log = logging.getLogger("kimi_pool.sync")


def account_from_row(row: AccountRow, catalogue: Catalogue | None = None, now: float | None = None, *,
                     runtime: Runtime | None = None) -> tuple[Account, str | None]:
    """The pool's view of a stored account, and why its credential could not be loaded (None if it could). A
    secret that cannot be resolved here (an ``env:VAR`` this process does not have), or a kimi-web token that has
    lapsed (at ``now``), makes it ``auth_dead`` with that reason. ``runtime``: the state to take instead of the
    row's (the server's own, not stored yet)."""
    spec = AccountRepository.to_spec(row)
    name, until, reason = runtime or (row.state, row.state_until, row.state_reason)
    state = State(name)
    problem = None
    try:
        secret = resolve_secret(spec.secret)
        if spec.kind == "kimi-web" and secret is not None and now is not None:
            check_fresh(secret, now, spec.name)
    except ConfigError as exc:
        problem = exc.message
        if spec.secret is not None and spec.secret.startswith("env:"):
            problem += " in the server's environment"
        secret, state, reason = None, State.AUTH_DEAD, problem
    if not row.enabled:
        state, reason = State.DISABLED, row.disabled_reason
    until = until if state in (State.COOLING_DOWN, State.QUOTA_EXHAUSTED) else None
    account = Account(spec, secret, rev=row.config_rev, state=state, until=until, reason=reason, catalogue=catalogue,
                      discovered=row.discovered_models, learned=row.learned_limits, limits_rev=row.limits_rev)
    account.stored = row.state_rev
    return account, problem


class AccountSync:
    def __init__(self, db: Database, pool: Pool, auth: Authenticator, clock: Clock, *, quiet: bool = False,
                 unsaved: Callable[[str], bool] | None = None) -> None:
        """``quiet``: log nothing of the accounts (a worker's copy; the keeper logs them). ``unsaved(name)``:
        whether the pool holds a state of the account that is not stored yet (``StateWriter.unsaved``)."""
        self._db = db
        self._pool = pool
        self._auth = auth
        self._clock = clock
        self._generation = 0
        self._loaded = asyncio.Condition()
        self._loading = asyncio.Lock()
        self._catalogue: Catalogue | None = None
        self._warned: dict[str, float] = {}  # account → the token expiry it was warned about
        self._problems: dict[str, str] = {}  # account → why its credential does not load, as last logged
        self._listeners: list[Callable[[], None]] = []
        self._quiet = quiet
        self._unsaved = unsaved

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
        changed: dict[str, str | None] = {}
        for row in rows:
            seen.add(row.name)
            current = self._pool.accounts.get(row.name)
            if current is None or current.rev != row.config_rev or current.discovered != row.discovered_models \
                    or rebuild:
                account, problem = account_from_row(row, catalogue, now, runtime=self._pending(current, row))
                self._pool.put(account)
                if not self._quiet:
                    log.info("account %s loaded (rev %d): %s%s", row.name, row.config_rev, account.state.value,
                             f" ({redact(account.reason)})" if account.reason else "")
                    self._say(row.name, problem)
                if problem != row.load_error:
                    changed[row.name] = problem
            if row.kind == "kimi-web" and not self._quiet:
                self._warn_lapsing(row, now)
        if changed and not self._quiet:
            await self._store_problems(changed)
        for name in set(self._pool.accounts) - seen:
            self._pool.remove(name)
            self._problems.pop(name, None)
            if not self._quiet:
                log.info("account %s removed", name)
        self._auth.set_client_keys(hashes)
        async with self._loaded:
            self._generation += 1
            self._loaded.notify_all()
        for listener in self._listeners:
            listener()

    def _pending(self, current: Account | None, row: AccountRow) -> Runtime | None:
        """The pool's state of the account, if it is newer than the row's: not stored yet, and the row
        still holds what the server last stored (else someone else wrote a state since, and it wins)."""
        if current is None or self._unsaved is None or not self._unsaved(row.name):
            return None
        if current.stored != row.state_rev or current.state is State.DISABLED:
            return None
        return current.runtime

    def _say(self, name: str, problem: str | None) -> None:
        """A WARNING when an account's credential cannot be loaded (once per problem), an INFO when it can again."""
        if problem == self._problems.get(name):
            return
        if problem is None:
            del self._problems[name]
            log.info("account %s: its credential loads again", name)
        else:
            self._problems[name] = problem
            log.warning("account %s takes no traffic: %s", name, problem)

    async def _store_problems(self, problems: dict[str, str | None]) -> None:
        """Store why accounts' credentials could not be loaded (``load_error``: ``accounts list`` shows it)."""
        try:
            async with self._db.session() as session, session.begin():
                accounts = AccountRepository(session)
                for name, problem in problems.items():
                    await accounts.save_load_error(name, problem)
        except SQLAlchemyError as exc:
            log.warning("could not record why accounts did not load: %s", type(exc).__name__)

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
