"""Every kernel state survives a gateway restart: the new process derives what it knows from
the database (the same SQLite file) and the host that keeps running. A kernel that was queued,
starting, running, suspended or resuming works afterwards, with its variables where it had
them, never hangs and is never billed twice. Real processes on loopback, fake GPUs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway
from kernel_ws import KernelSocket
from pool_processes import (
    H100_X1,
    assert_billed_once,
    gateway,
    heard,
    intervals,
    join,
    model,
    owned_on,
    restart,
    run,
    started,
    state_of,
)

pytestmark = pytest.mark.slow

__all__ = ["started"]  # the fixture


def start_in_background(gw: Gateway, body: dict[str, Any]) -> None:
    """POST /api/kernels without waiting for its answer (the gateway waits for the host)."""
    request = urllib.request.Request(
        gw.url + "/api/kernels", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"token {gw.token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        urllib.request.urlopen(request, timeout=0.5).close()
    except (TimeoutError, urllib.error.URLError):
        pass


def suspended_kernel(gw: Gateway) -> str:
    """A GPU kernel with x = 41 in it, suspended for being idle (its variables saved)."""
    kernel_id = str(gw.create(name=H100_X1, env={"KERNEL_IDLE_TIMEOUT": "2"})["id"])
    assert run(gw, kernel_id, "x = 41") == ""
    gw.wait_for(lambda: state_of(gw, kernel_id) == "suspended", 20, "the idle suspend")
    return kernel_id


def test_a_running_kernel_keeps_running_and_is_billed_once(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    kernel_id = str(gw.create(name=H100_X1)["id"])
    assert run(gw, kernel_id, "x = 41") == ""
    before = intervals(gw, kernel_id)

    again = restart(tmp_path, started, gw)
    assert state_of(again, kernel_id) == "running"
    again.wait_for(lambda: heard(again, agent), 10, "the host's next heartbeat")
    assert run(again, kernel_id, "print(x + 1)") == "42\n"
    time.sleep(1.2)  # heartbeats after the restart: still running, still one interval
    assert state_of(again, kernel_id) == "running"
    after = intervals(again, kernel_id)
    assert len(before) == len(after) == 1 and after[0]["interval"] == before[0]["interval"]
    assert after[0]["open"], after
    assert owned_on(agent, kernel_id) != [] and len(owned_on(agent, kernel_id)) == 1


def test_a_suspended_kernel_resumes_with_its_variables(tmp_path: Path, started: list[Any]) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    kernel_id = suspended_kernel(gw)

    again = restart(tmp_path, started, gw)
    assert state_of(again, kernel_id) == "suspended"
    again.wait_for(lambda: heard(again, agent), 10, "the host's next heartbeat")
    # The next cell resumes it on a GPU, with what it had; before the fix it waited forever.
    assert run(again, kernel_id, "print(x + 1)") == "42\n"
    rows = intervals(again, kernel_id)
    assert rows[0]["end_reason"] == "suspended" and len(rows) >= 2, rows
    assert_billed_once(again, kernel_id)


def test_a_queued_kernel_starts_when_a_gpu_frees(tmp_path: Path, started: list[Any]) -> None:
    gw = gateway(tmp_path, started)
    join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    holders = [str(gw.create(name=H100_X1)["id"]) for _ in range(2)]
    waiting = str(gw.create(name=H100_X1)["id"])
    assert state_of(gw, waiting) == "queued"

    again = restart(tmp_path, started, gw)
    assert state_of(again, waiting) == "queued"
    assert model(again, waiting)["gpupool"]["queue_position"] == 1
    assert again.call("DELETE", f"/api/kernels/{holders[0]}").status == 204
    again.wait_for(lambda: state_of(again, waiting) == "running", 20, "the queue to move")
    assert run(again, waiting, "print(6 * 7)") == "42\n"
    assert_billed_once(again, waiting)


def test_a_starting_kernel_starts_once(tmp_path: Path, started: list[Any]) -> None:
    """The gateway dies while the host starts the kernel: the new gateway starts it again, the
    first host kernel (whose answer nobody got) is stopped, and only one is billed."""
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    os.kill(agent.proc.pid, signal.SIGSTOP)  # the host takes its time to answer the start
    try:
        start_in_background(gw, {"name": H100_X1})
        listed = gw.wait_for(lambda: gw.call("GET", "/api/kernels").body, 10, "the kernel")
        kernel_id = str(listed[0]["id"])
        assert state_of(gw, kernel_id) == "starting"
        again = restart(tmp_path, started, gw)
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    assert state_of(again, kernel_id) in ("queued", "starting", "running")
    again.wait_for(lambda: state_of(again, kernel_id) == "running", 30, "the kernel to start")
    assert run(again, kernel_id, "print(6 * 7)") == "42\n"
    # The host kernel of the first start is stopped: one left, billed once.
    agent.wait_for(lambda: len(owned_on(agent, kernel_id)) == 1, 15, "the first start to stop")
    rows = intervals(again, kernel_id)
    assert len(rows) == 1 and rows[0]["open"], rows


def test_a_resuming_kernel_resumes_with_its_variables(tmp_path: Path, started: list[Any]) -> None:
    """The gateway dies while a suspended kernel is being resumed on its host."""
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    kernel_id = suspended_kernel(gw)

    async def resume_then_restart() -> Gateway:
        sock = await KernelSocket.open(gw.url, gw.token, kernel_id)
        os.kill(agent.proc.pid, signal.SIGSTOP)  # the resume's start waits for the host
        try:
            await sock.send("shell", "execute_request", {"code": "y = 1", "silent": False})
            for _ in range(100):
                if model(gw, kernel_id)["gpupool"]["state"] == "resuming":
                    break
                await asyncio.sleep(0.1)
            assert state_of(gw, kernel_id) == "resuming"
            return restart(tmp_path, started, gw)
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
            sock.close()

    again = asyncio.run(resume_then_restart())
    assert state_of(again, kernel_id) in ("resuming", "running")
    again.wait_for(lambda: state_of(again, kernel_id) == "running", 30, "the resume")
    assert run(again, kernel_id, "print(x + 1)") == "42\n"
    agent.wait_for(lambda: len(owned_on(agent, kernel_id)) == 1, 15, "the first start to stop")
    assert_billed_once(again, kernel_id)
