"""What the endpoints reach through ``request.app.state.gateway``: built by ``main``'s lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from app.api.auth import Authenticator
from app.clock import Clock
from app.config import Settings
from app.dispatch import Dispatcher
from app.pool.admission import Admission
from app.pool.scheduler import Pool
from app.pool.sessions import SessionTable


@dataclass(slots=True)
class Gateway:
    settings: Settings
    clock: Clock
    auth: Authenticator
    pool: Pool
    admission: Admission
    sessions: SessionTable
    dispatcher: Dispatcher
    started_at: float
    metrics: CollectorRegistry
