"""Fair share of the pool: a priority on each job; a share and a running limit on each key.

An index on (owner, started_at) serves the claim's read of each owner's latest start without
scanning every finished job.

Revision ID: 7a4e2c8f1b36
Revises: 7a4e2c9b1f08
Create Date: 2026-12-01 11:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7a4e2c8f1b36"
down_revision: str | Sequence[str] | None = "7a4e2c9b1f08"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch.create_index("ix_jobs_owner_started_at", ["owner", "started_at"], unique=False)
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column("share", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
        batch.add_column(sa.Column("max_running", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("max_running")
        batch.drop_column("share")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner_started_at")
        batch.drop_column("priority")
