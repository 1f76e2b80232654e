"""What the gateway must not forget: tenants, tokens, hosts, kernels and the ledger, in SQLite
(the embedded default) or PostgreSQL (`--db-url postgresql+psycopg://...`, for replicas). The
schema is made and changed by the Alembic migrations in migrations/, applied by open_store."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    event,
    make_url,
    text,
)  # fmt: skip
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as TimeoutError_
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .metrics import DB_ROUND_TRIPS, DB_SECONDS

log = logging.getLogger(__name__)
CONNECT_SECONDS = 5
LOCK_SECONDS = 5  # the longest a statement waits for a row or advisory lock
PING_AFTER_IDLE_SECONDS = 5.0  # a pooled PostgreSQL connection unused this long is checked first
IDLE_IN_TRANSACTION_SECONDS = 60
DB_RETRY_SECONDS = 5  # Retry-After of a 503 while the database does not answer


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
    # When it last joined the queue: the queue is the queued rows in this order.
    queued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The last time the gateway knew the kernel alive (its start, then each heartbeat that
    # reported it): where its ledger interval closes if it dies while nobody watches.
    last_seen_alive: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The gateway replica starting the kernel, or saving it for a suspend, and until when its
    # lease holds (renewed while it works); an expired lease lets another replica take over.
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)


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


class Secret(Base):
    """A gateway-wide token kept as its digest ("admin", "join"): every replica, and every
    command run against the database, checks tokens against the same row."""

    __tablename__ = "secrets"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    updated: Mapped[float] = mapped_column(Float, default=time.time)


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock's key for schema upgrades: any fixed number no other user of the
# database takes ("gpupool" in ASCII).
UPGRADE_LOCK = 0x677075706F6F6C
PLACEMENT_LOCK = UPGRADE_LOCK + 1  # one placement pass at a time, across replicas


def database_url(url_or_path: str) -> str:
    """A SQLAlchemy URL; a plain path means a SQLite file."""
    return url_or_path if "://" in url_or_path else f"sqlite:///{Path(url_or_path).resolve()}"


def _sqlite_file(url: str) -> Path | None:
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (made if missing), held until the block ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration, once however many gateways start at once: on
    PostgreSQL under an advisory lock held by the upgrading transaction, on SQLite under a lock
    on a file beside the database. A database made before migrations is adopted (0001)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    sqlite_file = _sqlite_file(str(engine.url)) if engine.dialect.name == "sqlite" else None
    lock = _file_lock(Path(f"{sqlite_file}.lock")) if sqlite_file else nullcontext()
    with lock, engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # Waits for another replica's upgrade however long it takes (not LOCK_SECONDS).
            connection.execute(text("SET LOCAL lock_timeout = 0"))
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK})
        context = MigrationContext.configure(connection)
        head = ScriptDirectory.from_config(config).get_current_head()
        if context.get_current_revision() == head:
            return  # the common case: another replica (or this one, before) did it
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        log.info("upgraded the gateway's database schema to revision %s", head)


@contextmanager
def placement_lock(db: sessionmaker[Session]) -> Iterator[None]:
    """Held by one gateway's placement pass at a time: on PostgreSQL a transaction advisory lock
    (released by the commit, or by the database when the holder's connection dies); SQLite has
    one gateway, whose own lock serialises its passes."""
    with db() as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PLACEMENT_LOCK})
        yield
        s.commit()


def make_engine(url_or_path: str) -> Engine:
    url = database_url(url_or_path)
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {}
    if url.startswith("postgresql"):
        # A connection left from before a database restart is found dead and replaced at once,
        # and a database that does not answer fails a request in seconds, not minutes.
        # A lock held by a replica that died or was cut off mid-transaction (its connection
        # not yet found dead) stops a waiting replica for LOCK_SECONDS at most, not hours: the
        # request gets 503, a background pass tries again; the server also ends a session left
        # idle inside a transaction, which frees its locks.
        settings = (
            f"-c lock_timeout={LOCK_SECONDS * 1000} "
            f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_SECONDS * 1000}"
        )
        connect = {"connect_timeout": CONNECT_SECONDS, "options": settings}
        options = {"connect_args": connect}
    try:
        engine = create_engine(url, **options)
    except ImportError as error:  # the URL's driver is not installed
        hint = ("install it: pip install 'gpupool[postgresql]'" if url.startswith("postgresql")
                else "use postgresql+psycopg://user:password@host:5432/name, sqlite:///path, "
                "or a file path")  # fmt: skip
        raise SystemExit(f"gpupool: cannot use the database URL {safe_url(url)}: its driver is "
                         f"missing ({error}); {hint}.") from None  # fmt: skip
    except (ArgumentError, NoSuchModuleError, ValueError) as error:  # ValueError: a bad port
        raise SystemExit(f"gpupool: cannot use the database URL {safe_url(url)}: {error}. "
                         "Use postgresql+psycopg://user:password@host:5432/name, "
                         "sqlite:///path, or a file path.") from None  # fmt: skip
    _count_round_trips(engine)
    if url.startswith("postgresql"):
        _ping_when_idle(engine)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _wal(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def _ping_when_idle(engine: Engine) -> None:
    """A connection left unused for PING_AFTER_IDLE_SECONDS is checked before it is handed out,
    and replaced if dead (a database restart, a network cut): SQLAlchemy's `pool_pre_ping`
    without its cost on a busy gateway, where it was one more round trip in every session,
    a third of a GET's. A connection used moments ago that has died meanwhile fails its
    statement instead: that request gets 503, and SQLAlchemy then replaces every connection
    that was pooled before the failure."""

    @event.listens_for(engine.pool, "checkin")
    def _idle(_dbapi: Any, record: Any) -> None:
        record.info["gpupool_idle_since"] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _check(dbapi: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("gpupool_idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        DB_ROUND_TRIPS.inc()
        try:
            cursor = dbapi.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except Exception as error:  # the pool drops it and tries another connection
            raise DisconnectionError(f"a pooled connection was dead: {error}") from error


def _count_round_trips(engine: Engine) -> None:
    """Count every round trip to the database, and the time statements take, in /metrics."""

    @event.listens_for(engine, "before_cursor_execute")
    def _began(connection: Any, *_: Any) -> None:
        connection.info["gpupool_began"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def _ended(connection: Any, *_: Any) -> None:
        began = connection.info.pop("gpupool_began", None)
        DB_ROUND_TRIPS.inc()
        if began is not None:
            DB_SECONDS.inc(time.perf_counter() - began)

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _ended_transaction(_connection: Any) -> None:
        DB_ROUND_TRIPS.inc()


def safe_url(url: str) -> str:
    """A database URL as logs and messages may show it: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(not a URL)"


def open_store(url_or_path: str) -> sessionmaker[Session]:
    """Open the database (creating a SQLite file if new) with its schema upgraded."""
    engine = make_engine(url_or_path)
    try:
        upgrade(engine)
    except OperationalError as error:
        raise SystemExit(
            f"gpupool: cannot reach the database at {safe_url(str(engine.url))}: "
            f"{str(error.orig).strip().splitlines()[0] if error.orig else error}. Check that it "
            "runs and that the URL, user and password are right."
        ) from None
    except DBAPIError as error:
        raise SystemExit(
            f"gpupool: the database at {safe_url(str(engine.url))} refused the schema upgrade: "
            f"{str(error.orig).strip().splitlines()[0] if error.orig else error}. Its user must "
            "be allowed to create and alter tables in it."
        ) from None
    return sessionmaker(engine, expire_on_commit=False)


def unavailable(error: BaseException) -> bool:
    """Whether `error` means the database cannot be reached now (down, restarting, the network),
    as opposed to a mistake in a request."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, OperationalError | InterfaceError | TimeoutError_)


def ping(db: sessionmaker[Session]) -> str:
    """Why the database does not answer a query, in a few words; empty when it does."""
    try:
        with db() as s:
            s.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        return (str(getattr(error, "orig", None) or error).strip().splitlines() or ["no answer"])[0]
    return ""
