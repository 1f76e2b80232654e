"""The gateway's schema as Alembic migrations; `store.open_store` applies them at start."""
