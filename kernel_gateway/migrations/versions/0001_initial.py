"""The schema as gpupool had it before migrations; a database made by an older gpupool (with
create_all, no alembic_version table) is adopted: its missing tables are made and its missing
columns added, so it keeps its tenants, kernels and ledger.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# A snapshot of the tables at this revision (not the models of today, which move on).
meta = sa.MetaData()
sa.Table(
    "tenants", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(24), unique=True, nullable=False),
    sa.Column("max_gpus", sa.Integer, nullable=True),
    sa.Column("max_kernels", sa.Integer, nullable=True),
    sa.Column("idle_min", sa.Float, nullable=True),
    sa.Column("idle_max", sa.Float, nullable=True),
    sa.Column("budget_usd", sa.Float, nullable=True),
    sa.Column("created", sa.Float, nullable=False, default=time.time),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
)  # fmt: skip
sa.Table(
    "tokens", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("digest", sa.String(64), unique=True, nullable=False),
    sa.Column("prefix", sa.String(8), nullable=False),
    sa.Column("kernel_id", sa.String(36), nullable=True, index=True),
    sa.Column("created", sa.Float, nullable=False, default=time.time),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
)  # fmt: skip
sa.Table(
    "hosts", meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("url", sa.String(1024), nullable=False),
    sa.Column("token", sa.String(128), nullable=False),
    sa.Column("token_salt", sa.String(64), nullable=True),
    sa.Column("isolates", sa.Boolean, nullable=True),
    sa.Column("last_seen", sa.Float, nullable=False, default=time.time),
    sa.Column("lost", sa.Boolean, nullable=False, default=False),
    sa.Column("gpus", sa.JSON, nullable=False, default=list),
)  # fmt: skip
sa.Table(
    "kernels", meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("gpu_type", sa.String(64), nullable=True),
    sa.Column("gpu_count", sa.Integer, nullable=False, default=0),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(512), nullable=False, default=""),
    sa.Column("host_id", sa.String(36), sa.ForeignKey("hosts.id"), nullable=True),
    sa.Column("host_kernel_id", sa.String(36), nullable=True),
    sa.Column("gpus", sa.JSON, nullable=False, default=list),
    sa.Column("env", sa.JSON, nullable=False, default=dict),
    sa.Column("idle_timeout", sa.Float, nullable=False, default=600.0),
    sa.Column("checkpoint", sa.JSON, nullable=False, default=dict),
    sa.Column("created", sa.Float, nullable=False, default=time.time),
    sa.Column("ended", sa.Float, nullable=True),
    sa.Column("last_seen_alive", sa.Float, nullable=True),
)  # fmt: skip
sa.Table(
    "ledger", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(64), unique=True, nullable=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("kernel_id", sa.String(36), sa.ForeignKey("kernels.id"), nullable=False,
              index=True),
    sa.Column("host_id", sa.String(36), nullable=True),
    sa.Column("gpu_type", sa.String(64), nullable=False),
    sa.Column("gpu_count", sa.Integer, nullable=False),
    sa.Column("usd_per_gpu_second", sa.Float, nullable=False),
    sa.Column("started", sa.Float, nullable=False, index=True),
    sa.Column("ended", sa.Float, nullable=True, index=True),
    sa.Column("end_reason", sa.String(32), nullable=False, default=""),
)  # fmt: skip
sa.Table(
    "shares", meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("outputs", sa.Boolean, nullable=False, default=True),
    sa.Column("mode", sa.String(8), nullable=False),
    sa.Column("access", sa.String(8), nullable=False),
    sa.Column("tenants", sa.JSON, nullable=False, default=list),
    sa.Column("kernel_name", sa.String(128), nullable=False),
    sa.Column("gpu_type", sa.String(64), nullable=True),
    sa.Column("gpu_count", sa.Integer, nullable=False, default=0),
    sa.Column("environment", sa.JSON, nullable=True),
    sa.Column("created", sa.Float, nullable=False, default=time.time),
    sa.Column("expires", sa.Float, nullable=True),
    sa.Column("revoked", sa.Float, nullable=True),
    sa.Column("views", sa.Integer, nullable=False, default=0),
    sa.Column("runs", sa.Integer, nullable=False, default=0),
)  # fmt: skip


def _server_default(column: sa.Column[Any]) -> Any:
    """What rows already in an older table get in a column added to it (None: cannot add)."""
    arg = getattr(column.default, "arg", None)
    if isinstance(arg, bool):
        return sa.true() if arg else sa.false()
    if isinstance(arg, int | float | str):
        return sa.text(repr(arg)) if not isinstance(arg, str) else arg
    if column.name in ("created", "last_seen"):  # default=time.time: unknown, so the epoch
        return sa.text("0")
    if isinstance(column.type, sa.JSON):  # default=list or dict
        return "[]" if column.name in ("gpus", "tenants") else "{}"
    return None


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    existing = set(inspector.get_table_names())
    for table in meta.sorted_tables:
        if table.name not in existing:
            table.create(bind)
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if column.nullable:
                op.add_column(table.name, sa.Column(column.name, column.type, nullable=True))
                continue
            default = _server_default(column)
            if default is not None:
                op.add_column(
                    table.name,
                    sa.Column(column.name, column.type, nullable=False, server_default=default),
                )


def downgrade() -> None:
    for table in reversed(meta.sorted_tables):
        op.drop_table(table.name)
