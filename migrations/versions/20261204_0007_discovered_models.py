"""Accounts remember what their upstream serves, what the server learned of their limits, and why the server
could not load them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("discovered_models", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("models_checked_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("learned_limits", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("limits_rev", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("load_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        for column in ("load_error", "limits_rev", "learned_limits", "models_checked_at", "discovered_models"):
            batch.drop_column(column)
