"""Alembic's environment: migrations run on the connection `store.upgrade` hands over (under its
lock), never on one made here, so `gpupool gateway` and the commands share one way in."""

from __future__ import annotations

from alembic import context

from kernel_gateway.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit(
        "the gateway's schema is upgraded by `gpupool gateway` at its start (or by "
        "kernel_gateway.store.open_store), which holds the lock that keeps replicas from "
        "upgrading it twice; run that instead of `alembic upgrade`."
    )
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
