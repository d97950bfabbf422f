"""An account's state revision (crash-safe state writes), file expiry, batch output expiry, and the
client key of a session binding (per-key caps).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("state_rev", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("expires_at", sa.Float(), nullable=True))
        batch.create_index("ix_files_expires_at", ["expires_at"])
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("output_expires_after", sa.Float(), nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("client_key", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("client_key")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("output_expires_after")
    with op.batch_alter_table("files") as batch:
        batch.drop_index("ix_files_expires_at")
        batch.drop_column("expires_at")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("state_rev")
