"""When each kernel joined the queue: the queue's order is read from the database, not kept in a
gateway's memory (a resume joins at the end; a start its host refused keeps its place).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("kernels") as batch:
        batch.add_column(sa.Column("queued_at", sa.Float, nullable=True))
    op.execute("UPDATE kernels SET queued_at = created")


def downgrade() -> None:
    with op.batch_alter_table("kernels") as batch:
        batch.drop_column("queued_at")
