"""What the gateway must not forget: tenants, tokens, hosts, kernels and the ledger, in SQLite
(or any SQLAlchemy URL, PostgreSQL included)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    event,
    inspect,
    text,
)  # fmt: skip
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(24), unique=True)
    max_gpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_kernels: Mapped[int | None] = mapped_column(Integer, nullable=True)
    idle_min: Mapped[float | None] = mapped_column(Float, nullable=True)  # bounds set by the admin
    idle_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    # US dollars per calendar month (UTC); None: no budget.
    budget_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    created: Mapped[float] = mapped_column(Float, default=time.time)
    revoked: Mapped[bool] = mapped_column(default=False)


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the token
    prefix: Mapped[str] = mapped_column(String(8))  # shown in listings, to tell tokens apart
    # Set for the token a kernel gets in GPUPOOL_TOKEN: it is revoked when that kernel process
    # ends (shut down, died, suspended), so a token does not outlive the kernel that held it.
    kernel_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    created: Mapped[float] = mapped_column(Float, default=time.time)
    revoked: Mapped[bool] = mapped_column(default=False)


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    url: Mapped[str] = mapped_column(String(1024))
    # The sha256 digest of the host's token; the token itself is derived again from the
    # gateway's host key and `token_salt` (tokens.host_token), never stored.
    token: Mapped[str] = mapped_column(String(128))
    token_salt: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Whether the host runs each tenant's kernels as its own Unix user (None: it did not say).
    isolates: Mapped[bool | None] = mapped_column(nullable=True)
    last_seen: Mapped[float] = mapped_column(Float, default=time.time)
    lost: Mapped[bool] = mapped_column(default=False)
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)


class Kernel(Base):
    __tablename__ = "kernels"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    gpu_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(512), default="")
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id"), nullable=True)
    host_kernel_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    gpus: Mapped[list[str]] = mapped_column(JSON, default=list)
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    idle_timeout: Mapped[float] = mapped_column(Float, default=600.0)
    # Set while suspended (and until resumed): {"host_id", "path", "saved", "not_saved"}.
    checkpoint: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[float] = mapped_column(Float, default=time.time)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The last time the gateway knew the kernel alive (its start, then each heartbeat that
    # reported it): where its ledger interval closes if it dies while nobody watches.
    last_seen_alive: Mapped[float | None] = mapped_column(Float, nullable=True)


class LedgerInterval(Base):
    """One GPU hold: opened when a kernel's GPUs become held, closed once when they are released.
    Rows are never deleted, and only `ended` and `end_reason` are ever written after the insert,
    once, by an update guarded on `ended IS NULL` (see ledger.py)."""

    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)  # "{kernel_id}:{n}", n from 1
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    kernel_id: Mapped[str] = mapped_column(ForeignKey("kernels.id"), index=True)
    host_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    gpu_type: Mapped[str] = mapped_column(String(64))
    gpu_count: Mapped[int] = mapped_column(Integer)
    usd_per_gpu_second: Mapped[float] = mapped_column(Float)  # the price when it opened
    started: Mapped[float] = mapped_column(Float, index=True)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    end_reason: Mapped[str] = mapped_column(String(32), default="")


class Share(Base):
    """A shared notebook link. The snapshot itself is a file named by its sha256 in the state
    folder's shares/ (shares.py); the row says who may open it and how, and is never changed
    after the insert but for its counts and `revoked`."""

    __tablename__ = "shares"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the link's secret part
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))  # the notebook's file name, as given
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of the snapshot file
    size: Mapped[int] = mapped_column(Integer)
    outputs: Mapped[bool] = mapped_column(default=True)  # kept (True) or stripped
    mode: Mapped[str] = mapped_column(String(8))  # view | run
    access: Mapped[str] = mapped_column(String(8))  # anyone | gateway | tenants
    tenants: Mapped[list[str]] = mapped_column(JSON, default=list)  # for access "tenants"
    kernel_name: Mapped[str] = mapped_column(String(128))
    gpu_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    # What the sharer's kernel reported (None: not asked): {"python", "packages": {name: ver}}.
    environment: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created: Mapped[float] = mapped_column(Float, default=time.time)
    expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked: Mapped[float | None] = mapped_column(Float, nullable=True)
    views: Mapped[int] = mapped_column(Integer, default=0)
    runs: Mapped[int] = mapped_column(Integer, default=0)


def _add_missing_columns(engine: Engine) -> None:
    """A database made by an older gpupool lacks the columns added since: add those that are
    nullable or have a plain default, so an upgrade keeps its tenants and kernels (create_all
    makes new tables, never new columns)."""
    inspector = inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            if not inspector.has_table(table.name):
                continue
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                kind = column.type.compile(engine.dialect)
                default = getattr(column.default, "arg", None)
                if isinstance(default, (int, float)) and not isinstance(default, bool):
                    kind += f" DEFAULT {default!r}"
                elif not column.nullable:
                    continue
                connection.execute(
                    text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
                )


def open_store(url_or_path: str) -> sessionmaker[Session]:
    """Open (creating if new) the database; a plain path means SQLite in WAL mode."""
    url = url_or_path if "://" in url_or_path else f"sqlite:///{Path(url_or_path).resolve()}"
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _wal(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    return sessionmaker(engine, expire_on_commit=False)
