"""jobs.received_at: when a worker last took the job's message, so the reaper can tell an
outstanding message from a lost one and never piles up a second.

Revision ID: 5d3c1a9e7b21
Revises: 5c2f7a9d1e34
Create Date: 2026-11-30 22:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5d3c1a9e7b21"
down_revision: str | Sequence[str] | None = "5c2f7a9d1e34"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("received_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("received_at")
