"""Revoking a tenant ends everything of it: its tokens stop working, its open kernel websockets
close (no more code runs through them), its kernels are shut down on their hosts, and their
ledger intervals close. By the admin route, by `gpupool tenant revoke` beside a live gateway,
and by the CLI while no gateway runs (the next gateway does the rest at its start)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, HostAgent
from kernel_ws import KernelSocket
from pool_processes import H100_X1, gateway, join, owned_on, restart, started

__all__ = ["started"]  # a fixture, used by name


def ledger(gw: Gateway, kernel_id: str) -> list[tuple[Any, str]]:
    rows = gw.sql("select ended, end_reason from ledger where kernel_id = :id", id=kernel_id)
    return [(ended, reason) for ended, reason in rows]


def free_h100(gw: Gateway, token: str) -> int:
    return int(next(g["free"] for g in gw.call("GET", "/api/gpus", token=token).body))


def tenant_cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    return subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "tenant", *args, "--state-dir",
         str(gw.state_dir), *(["--db-url", gw.db_url] if gw.db_url else [])],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def doomed_tenant(gw: Gateway) -> tuple[str, list[str]]:
    """Tenant "gone" with two running GPU kernels (billed) and a queued one."""
    token = gw.tenant("gone")
    kernels = [gw.call("POST", "/api/kernels", {"name": H100_X1}, token=token).body
               for _ in range(3)]  # fmt: skip
    assert [k["gpupool"]["state"] for k in kernels] == ["running", "running", "queued"], kernels
    return token, [k["id"] for k in kernels]


def assert_all_ended(gw: Gateway, agent: HostAgent, token: str, kernels: list[str]) -> None:
    """The four effects of a revocation."""
    assert gw.call("GET", "/api/kernels", token=token).status == 401
    for kernel_id in kernels:
        assert owned_on(agent, kernel_id) == [], kernel_id
    for kernel_id in kernels[:2]:
        [(ended, reason)] = ledger(gw, kernel_id)
        assert ended is not None and reason == "revoked"
    assert ledger(gw, kernels[2]) == []  # it never ran, so it never billed
    states = {s for (s,) in gw.sql("select state from kernels")}
    assert states == {"deleted"}, states


def test_the_admin_route_ends_the_tenants_websockets_kernels_and_billing(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    other = gw.tenant("other")
    token, kernels = doomed_tenant(gw)

    async def revoked_under_a_running_cell() -> tuple[Any, str]:
        sock = await KernelSocket.open(gw.url, token, kernels[0])
        await sock.kernel_info()
        forever = "import time\nwhile True: time.sleep(0.1)"
        await sock.send("shell", "execute_request", {"code": forever, "silent": False})
        revoke = gw.call("DELETE", "/api/admin/tenants/gone", token=gw.admin_token)
        assert revoke.status == 204, revoke.body
        while await asyncio.wait_for(sock.conn.read_message(), 10) is not None:
            pass
        return sock.conn.close_code, sock.conn.close_reason or ""

    code, reason = asyncio.run(revoked_under_a_running_cell())
    assert code == 1008 and "revoked" in reason, (code, reason)
    assert_all_ended(gw, agent, token, kernels)
    assert free_h100(gw, other) == 2  # its GPUs are the pool's again
    # Revoking again is harmless.
    assert gw.call("DELETE", "/api/admin/tenants/gone", token=gw.admin_token).status == 204


def test_gpupool_tenant_revoke_asks_the_live_gateway(tmp_path: Path, started: list[Any]) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    token, kernels = doomed_tenant(gw)

    async def revoked_by_the_cli() -> tuple[Any, str, subprocess.CompletedProcess[str]]:
        sock = await KernelSocket.open(gw.url, token, kernels[1])
        await sock.kernel_info()
        done = await asyncio.to_thread(tenant_cli, gw, "revoke", "gone")
        while await asyncio.wait_for(sock.conn.read_message(), 10) is not None:
            pass
        return sock.conn.close_code, sock.conn.close_reason or "", done

    code, reason, done = asyncio.run(revoked_by_the_cli())
    assert done.returncode == 0, done.stderr
    assert "closed its websockets and shut its kernels down" in done.stdout, done.stdout
    assert code == 1008 and "revoked" in reason, (code, reason)
    assert_all_ended(gw, agent, token, kernels)


@pytest.mark.slow
def test_a_tenant_revoked_while_no_gateway_runs_is_ended_at_its_start(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    token, kernels = doomed_tenant(gw)
    gw.proc.kill()
    gw.proc.wait(10)

    done = tenant_cli(gw, "revoke", "gone")
    assert done.returncode == 0, done.stderr
    assert "shut down when the gateway next starts" in done.stdout, done.stdout

    again = restart(tmp_path, started, gw)

    def ended() -> bool:  # the host stops a kernel before the gateway closes its billing
        stopped = all(not owned_on(agent, k) for k in kernels)
        return stopped and all(end is not None for k in kernels[:2] for end, _ in ledger(again, k))

    again.wait_for(ended, 15, "the kernels to stop and their billing to end")
    assert_all_ended(again, agent, token, kernels)
