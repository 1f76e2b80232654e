"""Secrets at rest and in flight: the gateway's state folder is its owner's alone, hosts' tokens
are kept as digests (a database of an older gpupool is converted), the join token reaches a host
by a file or the environment, never a command line, and a second tenant is refused on a host that
runs every tenant's kernels as one user unless the admin accepts it."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, start_gateway, start_host

from kernel_gateway.tokens import host_token


def register(gateway: Gateway, url: str = "http://127.0.0.1:9", **extra: Any) -> dict[str, Any]:
    body = {"url": url, "gpus": [], **extra}
    reply = gateway.call("POST", "/api/hosts/register", body, token=gateway.join_token)
    assert reply.status == 200, reply.body
    return dict(reply.body)


def heartbeat(gateway: Gateway, host_id: str, token: str) -> int:
    return gateway.call("POST", f"/api/hosts/{host_id}/heartbeat", {}, token=token).status


def hosts_rows(state: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(state / "gateway.db") as db:
        return db.execute("select id, token, token_salt, isolates from hosts").fetchall()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_state_folder_0700_and_its_files_0600(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path)
    try:
        register(gateway)  # the database has rows, and its -wal file exists
        state = gateway.state_dir
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
        assert {"admin-token", "join-token", "host-key", "gateway.db"} <= set(files), files
        assert set(files.values()) == {0o600}, files
    finally:
        gateway.stop()


@pytest.mark.slow
def test_host_tokens_are_kept_as_digests_and_survive_a_restart(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path)
    try:
        answer = register(gateway, isolates=True)
        host_id, token = answer["host_id"], answer["host_token"]
        [(_, stored, salt, isolates)] = hosts_rows(gateway.state_dir)
        assert stored == sha256(token) and token not in (stored, salt), stored
        assert isolates == 1
        # What the database holds is no token at all.
        assert heartbeat(gateway, host_id, stored) == 404
        assert heartbeat(gateway, host_id, token) == 200
    finally:
        gateway.stop()
    key = (gateway.state_dir / "host-key").read_text().strip()
    assert host_token(key, salt) == token  # derived again from the key, which stays outside
    again = start_gateway(tmp_path, state=gateway.state_dir)
    try:
        assert heartbeat(again, host_id, token) == 200
    finally:
        again.stop()


def test_a_database_holding_a_host_token_is_converted(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path)
    try:
        host_id = register(gateway)["host_id"]
    finally:
        gateway.stop()
    with sqlite3.connect(gateway.state_dir / "gateway.db") as db:  # as an older gpupool kept it
        db.execute("update hosts set token = 'plain-old-token', token_salt = NULL")
    again = start_gateway(tmp_path, state=gateway.state_dir)
    try:
        [(_, stored, salt, _)] = hosts_rows(gateway.state_dir)
        assert (stored, salt) == (sha256("plain-old-token"), "")
        # The host is refused once and registers again, for a token kept the new way.
        assert heartbeat(again, host_id, "plain-old-token") == 404
        answer = register(again)
        assert (
            answer["host_id"] == host_id and heartbeat(again, host_id, answer["host_token"]) == 200
        )
    finally:
        again.stop()


def test_join_token_from_a_file_never_on_the_command_line(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path)
    agent = None
    try:
        join_file = tmp_path / "join"
        join_file.write_text(gateway.join_token + "\n")
        join_file.chmod(0o600)
        (tmp_path / "host").mkdir()
        agent = start_host(tmp_path / "host", "--fake-gpus", "H100:1", "--no-isolate",
                           "--gateway", gateway.url, "--join-token-file", str(join_file),
                           "--heartbeat-seconds", "0.5")  # fmt: skip
        gateway.wait_for(lambda: hosts_rows(gateway.state_dir), 30, "the host to register")
        cmdline = Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().decode()
        assert gateway.join_token not in cmdline
        log = agent.log_path.read_text()
        assert "isolation: OFF (--no-isolate)" in log, log
        assert "command line" not in log  # no warning: the token came from the file
    finally:
        if agent is not None:
            agent.stop()
        gateway.stop()


def tenant(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "tenant", "--state-dir", str(state),
         "create", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_second_tenant_refused_on_a_shared_host(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, "--host-timeout", "600")  # the host never heartbeats
    try:
        register(gateway, isolates=False)
        state = gateway.state_dir
        assert tenant(state, "first").returncode == 0
        refused = tenant(state, "second")
        assert refused.returncode != 0 and "--allow-shared-host" in refused.stderr, refused
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert gateway.call("GET", "/api/admin/tenants", token=gateway.admin_token).body
        names = [t["name"] for t in gateway.call(
            "GET", "/api/admin/tenants", token=gateway.admin_token).body]  # fmt: skip
        assert names == ["first"]
        assert tenant(state, "second", "--allow-shared-host").returncode == 0
    finally:
        gateway.stop()


def test_the_admin_route_refuses_a_second_tenant_on_a_shared_host_too(tmp_path: Path) -> None:
    """POST /api/admin/tenants applies the refusal of `gpupool tenant create`: 409 unless the
    admin sends allow_shared_host: true (a boolean, nothing that merely looks true)."""
    gateway = start_gateway(tmp_path, "--host-timeout", "600")  # the host never heartbeats
    admin = gateway.admin_token

    def create(body: Any) -> Any:
        return gateway.call("POST", "/api/admin/tenants", body, token=admin)

    try:
        register(gateway, isolates=False)
        assert create({"name": "first"}).status == 201  # the first tenant is alone there
        refused = create({"name": "second"})
        assert refused.status == 409, refused.body
        assert "runs every tenant's kernels as one Unix user" in refused.body["message"]
        assert '"allow_shared_host": true' in refused.body["message"]
        for wrong in ("true", 1, "yes", None, [True], {"x": True}):
            bad = create({"name": "second", "allow_shared_host": wrong})
            assert bad.status == 400, (wrong, bad.body)
            assert "allow_shared_host must be true or false" in bad.body["message"]
        assert create({"name": "second", "allow_shared_host": False}).status == 409
        # Not an admin: 401 before anything else, the flag changes nothing.
        sneaky = {"name": "second", "allow_shared_host": True}
        assert gateway.call("POST", "/api/admin/tenants", sneaky, token="").status == 401
        names = [t["name"] for t in gateway.call("GET", "/api/admin/tenants", token=admin).body]
        assert names == ["first"]
        made = create({"name": "second", "allow_shared_host": True})
        assert made.status == 201, made.body
        again = create({"name": "second", "allow_shared_host": True})
        assert again.status == 409 and "already exists" in again.body["message"]
        # A bad name is 400, checked before the refusal.
        assert create({"name": "Bad Name"}).status == 400
    finally:
        gateway.stop()


def test_isolating_hosts_take_any_number_of_tenants(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path)
    try:
        register(gateway, isolates=True)
        for name in ("one", "two", "three"):
            made = tenant(gateway.state_dir, name)
            assert made.returncode == 0, made.stderr
    finally:
        gateway.stop()


def test_a_join_token_on_the_command_line_is_warned_about(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path)
    agent = None
    try:
        (tmp_path / "host").mkdir()
        join = f"--join-token={gateway.join_token}"
        agent = start_host(tmp_path / "host", "--fake-gpus", "H100:1", "--no-isolate",
                           "--gateway", gateway.url, join)  # fmt: skip
        agent.wait_for(lambda: "read it; pass it in $GPUPOOL_JOIN_TOKEN" in agent.log(), 30,
                       "the warning")  # fmt: skip
        assert gateway.join_token not in agent.log_path.read_text()
    finally:
        if agent is not None:
            agent.stop()
        gateway.stop()
