"""The gateway's database: Alembic migrations (fresh, adopted from an older gpupool, many at once
under the lock), PostgreSQL by --db-url for the gateway and the commands, the admin and join
tokens shared through it, /api/health, and a database that goes away and comes back."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import Gateway, free_port, start_gateway
from postgres import Postgres, Unavailable
from sqlalchemy import text

from kernel_gateway.store import Base, Tenant, make_engine, open_store

HEAD = "0004"


def fresh_url(kind: str, tmp_path: Path, postgres_server: Any) -> str:
    if kind == "sqlite":
        return str(tmp_path / "gateway.db")
    return str(postgres_server().database(str(tmp_path / f"db-{time.monotonic_ns()}")))


@pytest.fixture
def server_of(request: pytest.FixtureRequest) -> Any:
    return lambda: request.getfixturevalue("postgres")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migrations_make_the_schema_of_the_models(
    kind: str, tmp_path: Path, server_of: Any
) -> None:
    url = fresh_url(kind, tmp_path, server_of)
    open_store(url)
    open_store(url)  # a second start finds it at head and changes nothing
    with make_engine(url).connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == HEAD
        diffs = [d for d in compare_metadata(context, Base.metadata) if d[0] != "remove_table"
                 or d[1].name != "alembic_version"]  # fmt: skip
    assert diffs == [], diffs


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_many_gateways_starting_at_once_upgrade_once(
    kind: str, tmp_path: Path, server_of: Any
) -> None:
    url = fresh_url(kind, tmp_path, server_of)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_store(url)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with make_engine(url).connect() as connection:
        rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    assert rows == [(HEAD,)]


def test_a_database_of_an_older_gpupool_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    with sqlite3.connect(path) as old:  # as create_all made it, before migrations and budgets
        old.execute(
            "CREATE TABLE tenants (id INTEGER PRIMARY KEY, name VARCHAR(24) UNIQUE, "
            "max_gpus INTEGER, max_kernels INTEGER, created FLOAT, revoked BOOLEAN)"
        )
        old.execute("CREATE TABLE hosts (id VARCHAR(36) PRIMARY KEY, name VARCHAR(255), "
                    "url VARCHAR(1024), token VARCHAR(128), last_seen FLOAT)")  # fmt: skip
        old.execute("INSERT INTO tenants VALUES (1, 'old', 2, NULL, 5, 0)")
        old.execute("INSERT INTO hosts VALUES ('h', 'h', 'http://h:1', 'abc', 7)")
    db = open_store(str(path))
    with db() as s:
        [tenant] = s.query(Tenant).all()
        host = s.execute(text("SELECT lost, gpus, token_salt FROM hosts")).one()
    assert (tenant.name, tenant.max_gpus, tenant.budget_usd, tenant.revoked) == ("old", 2, None,
                                                                              False)  # fmt: skip
    assert (bool(host.lost), host.gpus, host.token_salt) == (False, "[]", None)
    with sqlite3.connect(path) as upgraded:
        assert upgraded.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
        assert upgraded.execute("SELECT count(*) FROM secrets").fetchone() == (0,)


def run_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    command = [sys.executable, "-m", "gpupool.cli", *args]
    return subprocess.run(
        command, text=True, capture_output=True, timeout=60, env={**clean, **(env or {})}
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nonsense://x", "cannot use the database URL"),
        ("postgresql+psycopg://gpupool:secret@127.0.0.1:1/x", "cannot reach the database"),
        ("mysql://u:p@127.0.0.1:1/x", "cannot use the database URL"),  # no driver installed
        ("postgresql+psycopg://u:secret@127.0.0.1:port/x", "cannot use the database URL"),
    ],
)
def test_a_bad_database_url_is_one_clear_sentence(url: str, says: str, tmp_path: Path) -> None:
    commands = [["gateway", "--port", str(free_port()), "--state-dir", str(tmp_path)]]
    if url.startswith("postgresql"):  # the commands share the gateway's way in: one check
        commands += [["tenant", "list"], ["usage"]]
    for command in commands:
        done = run_command(*command, "--db-url", url)
        assert done.returncode != 0
        assert says in done.stderr, done.stderr
        assert "secret" not in done.stderr  # the password is never shown
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_replicas_and_commands_share_tokens_through_postgresql(
    tmp_path: Path, postgres: Postgres
) -> None:
    url = postgres.database(str(tmp_path / "shared"))
    admin, join = "a" * 64, "b" * 64
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    # The first replica is given the tokens (as a Kubernetes Secret would).
    first = start_gateway(tmp_path / "one", "--db-url", url, f"--GatewayApp.admin_token={admin}",
                          f"--GatewayApp.join_token={join}")  # fmt: skip
    second = start_gateway(tmp_path / "two", "--db-url", url)  # not given them: its files differ
    try:
        assert second.admin_token != admin
        made = first.call("POST", "/api/admin/tenants", {"name": "team"}, token=admin)
        assert made.status == 201, made.body
        # The other replica knows the admin token and the tenant, and not its own file's token.
        assert second.call("GET", "/api/admin/tenants", token=admin).status == 200
        assert second.call("GET", "/api/admin/tenants", token=second.admin_token).status == 401
        assert second.call("GET", "/api/kernels", token=made.body["token"]).status == 200
        register = {"url": "http://127.0.0.1:1", "gpus": [], "isolates": True}
        assert second.call("POST", "/api/hosts/register", register, token="c" * 64).status == 401
        assert second.call("POST", "/api/hosts/register", register, token=join).status != 401
        # The commands read the same database.
        listed = run_command("tenant", "list", "--db-url", url)
        assert listed.returncode == 0 and listed.stdout.startswith("team\tactive"), listed
        usage = run_command("usage", "--db-url", url)
        assert usage.returncode == 0 and "no GPU time billed" in usage.stdout, usage
        made2 = run_command("tenant", "create", "cli-made", env={"GPUPOOL_DB_URL": url})
        token = made2.stdout.strip().splitlines()[-1]
        assert first.call("GET", "/api/kernels", token=token).status == 200
        revoked = run_command("tenant", "revoke", "cli-made", "--db-url", url)
        assert "DELETE /api/admin/tenants/cli-made" in revoked.stdout, revoked
        assert second.call("GET", "/api/kernels", token=token).status == 401
    finally:
        first.stop()
        second.stop()


def test_health_says_whether_the_database_answers(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path)
    try:
        reply = gateway.call("GET", "/api/health", token="")
        assert (reply.status, reply.body) == (200, {"status": "ok", "database": "ok"})
        assert gateway.call("POST", "/api/health", {}, token="").status == 405
        assert gateway.call("GET", "/api/health/x", token="").status == 404
    finally:
        gateway.stop()


def test_a_database_that_goes_away_gets_503_and_the_gateway_recovers(tmp_path: Path) -> None:
    try:
        server = Postgres(free_port())  # its own: this test stops it
    except Unavailable as why:
        pytest.skip(f"PostgreSQL tests skipped: {why}")
    try:
        gateway = start_gateway(tmp_path, "--db-url", server.database("outage"))
        try:
            outage(gateway, server)
        finally:
            gateway.stop()
    finally:
        server.close()


def outage(gateway: Gateway, server: Postgres) -> None:
    tenant = gateway.tenant("team")
    server.stop()
    for path, token in (("/api/health", ""), ("/api/kernels", tenant),
                        ("/api/admin/tenants", gateway.admin_token)):  # fmt: skip
        reply = gateway.call("GET", path, token=token)
        assert reply.status == 503, (path, reply.body)
        assert int(reply.headers["Retry-After"]) >= 1
        assert "try again" in reply.body["message"].lower()
    refused = gateway.call("POST", "/api/admin/tenants", {"name": "during"},
                           token=gateway.admin_token)  # fmt: skip
    assert refused.status == 503
    assert "Traceback" not in gateway.log()
    server.start()
    gateway.wait_for(lambda: gateway.call("GET", "/api/health", token="").status == 200,
                     what="health after the database came back")  # fmt: skip
    assert gateway.call("GET", "/api/kernels", token=tenant).status == 200
    names = [t["name"] for t in gateway.call("GET", "/api/admin/tenants",
                                              token=gateway.admin_token).body]  # fmt: skip
    assert names == ["team"]  # nothing half-written while it was away


def test_an_unknown_kind_of_database_is_refused_before_any_connection() -> None:
    with pytest.raises(SystemExit, match="cannot use the database URL"):
        make_engine("nonsense://x")


def test_a_database_user_that_may_not_create_tables_is_told_so(
    tmp_path: Path, postgres: Postgres
) -> None:
    import psycopg

    url = postgres.database(str(tmp_path))
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=gpupool dbname=postgres",
                         autocommit=True) as connection:  # fmt: skip
        connection.execute("DROP ROLE IF EXISTS reader")
        connection.execute("CREATE ROLE reader LOGIN")
    reader = url.replace("//gpupool@", "//reader@")
    with pytest.raises(SystemExit, match="must be allowed to create and alter tables"):
        open_store(reader)
