"""Which models each account serves, asked of its upstream: Kimi's model ids keep changing, so a list in the
code goes stale.

``discover`` asks one account's adapter (``Upstream.models``: Moonshot's ``GET /v1/models``; kimi-web and
kimi-ai-chat do not say, and keep their configured or default list). ``ModelDiscovery`` is the server's
refresh: at start, then every ``interval`` seconds, it asks every enabled account whose list is older than
that, stores what it was told (``AccountRepository.set_models``) and reloads the pool if a list changed
(``app.sync`` rebuilds such an account), so a model that appears upstream is offered and one that disappears stops
being offered. An account with a ``--model`` list of its own is not asked: that list decides what it serves.
``accounts add``/``edit``/``check`` and the admin API ask at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.accounts_config import AccountSpec, resolve_secret
from app.clock import Clock
from app.errors import ConfigError, UpstreamError
from app.pool.account import Account, State
from app.store.db import Database
from app.store.repository import AccountRepository

if TYPE_CHECKING:  # the command line imports this module without the upstream client or the server's parts
    from app.store.writer import WriteBehind
    from app.sync import AccountSync
    from app.upstreams.registry import Registry

log = logging.getLogger("kimi_pool.discovery")

RETRY_AFTER = 300.0
"""The refresh looks for accounts to ask at least this often: one added without asking, or whose upstream
could not be asked, is asked again within this many seconds."""
STARTUP_WAIT = 5.0
"""How long (real seconds) the server waits, before it serves, for the first answers."""


@dataclass(frozen=True, slots=True)
class Found:
    """What one account's upstream said it serves."""

    name: str
    models: tuple[str, ...] | None
    """None: the upstream does not say, or it could not be asked (``error``)."""
    error: str | None = None


def change(before: Iterable[str] | None, after: Iterable[str]) -> str:
    """``+kimi-k4, -kimi-k2.5``: what a new list adds and drops (empty if nothing)."""
    old, new = list(before or ()), list(after)
    return ", ".join([f"+{m}" for m in new if m not in old] + [f"-{m}" for m in old if m not in new])


async def discover(registry: Registry, spec: AccountSpec) -> Found:
    """Ask ``spec``'s upstream which models it serves; a failure is reported in ``Found.error``, never raised.
    An account with a model list of its own (``--model``) is not asked: its operator decided."""
    if spec.models:
        return Found(spec.name, None)
    try:
        secret = resolve_secret(spec.secret)
    except ConfigError as exc:
        return Found(spec.name, None, exc.message)
    try:
        models = await registry.get(spec.kind).models(Account(spec, secret))
    except UpstreamError as exc:
        return Found(spec.name, None, exc.message)
    return Found(spec.name, models)


class ModelDiscovery:
    def __init__(self, db: Database, registry: Registry, clock: Clock, *, interval: float,
                 writer: WriteBehind | None = None, sync: AccountSync | None = None, concurrency: int = 16) -> None:
        """``interval``: how old an account's list may grow before it is asked again. ``writer`` is flushed
        before a change is stored and ``sync`` reloads the pool after it, as the admin API does."""
        self._db = db
        self._registry = registry
        self._clock = clock
        self._interval = interval
        self._writer = writer
        self._sync = sync
        self._gate = asyncio.Semaphore(concurrency)
        self._failing: set[str] = set()
        self._runs = 0
        self._ran = asyncio.Condition()

    @property
    def runs(self) -> int:
        """How many periodic refreshes have finished (the one at start included)."""
        return self._runs

    async def wait_runs(self, count: int) -> None:
        """Return once ``runs`` reaches ``count``."""
        async with self._ran:
            await self._ran.wait_for(lambda: self._runs >= count)

    async def run(self) -> None:
        """Refresh now, then whenever accounts fall due, until cancelled."""
        while True:
            try:
                await self.refresh(due=True)
            except Exception:
                log.exception("asking the upstreams which models they serve failed; will try again")
            async with self._ran:
                self._runs += 1
                self._ran.notify_all()
            await self._clock.sleep(min(self._interval, RETRY_AFTER))

    async def refresh(self, names: list[str] | None = None, *, due: bool = False) -> list[Found]:
        """Ask the named accounts (None: every enabled one that is not dead and has no list of its own) which models
        they serve, store the answers and reload the pool if a list changed. ``due``: only those not asked for
        ``interval`` seconds."""
        now = self._clock.time()
        async with self._db.session() as session:
            repo = AccountRepository(session)
            if names is not None:
                rows = [await repo.get(name) for name in names]
            else:
                rows = [row for row in await repo.list() if row.enabled and not row.models
                        and row.state != State.AUTH_DEAD and row.load_error is None]
            if due:
                rows = [row for row in rows
                        if row.models_checked_at is None or now - row.models_checked_at >= self._interval]
            specs = [(repo.to_spec(row), row.discovered_models) for row in rows]
        found = await asyncio.gather(*(self._ask(spec) for spec, _ in specs))
        told = [f for f in found if f.models is not None]
        if told:
            changed = await self._store(told, {spec.name: before for spec, before in specs})
            if changed and self._sync is not None:
                await self._sync.load()
        return list(found)

    async def _ask(self, spec: AccountSpec) -> Found:
        async with self._gate:
            found = await discover(self._registry, spec)
        if found.error is None:
            if spec.name in self._failing:
                self._failing.discard(spec.name)
                log.info("account %s: its upstream tells its models again", spec.name)
        elif spec.name not in self._failing:
            self._failing.add(spec.name)
            log.warning("account %s: could not ask its upstream which models it serves (%s); it keeps the list it "
                        "has", spec.name, found.error)
        return found

    async def _store(self, told: list[Found], before: dict[str, list[str] | None]) -> bool:
        if self._writer is not None and any(list(f.models or ()) != before.get(f.name) for f in told):
            await self._writer.flush()  # the reload that follows must not bring back a state older than the pool's
        changed = False
        async with self._db.session() as session, session.begin():
            repo = AccountRepository(session)
            for found in told:
                assert found.models is not None
                try:
                    if not await repo.set_models(found.name, found.models, self._clock.time()):
                        continue
                except ConfigError:  # removed while it was asked
                    continue
                changed = True
                what = change(before.get(found.name), found.models)
                log.info("account %s: its upstream serves %d model(s)%s", found.name, len(found.models),
                         f" ({what})" if what else "")
        return changed
