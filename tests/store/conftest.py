"""A migrated SQLite file per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.store.db import Database


@pytest.fixture
async def migrated(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/kimi-pool.db")
    await database.upgrade()
    yield database
    await database.dispose()
