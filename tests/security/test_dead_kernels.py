"""A kernel whose process dies on its host, or whose host stops answering, is marked dead at the
gateway: its billing ends, its open websockets close saying it ended and why, and the next
connection is refused with the reason, rather than waiting on a kernel that is gone."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from kernel_ws import KernelSocket, run_code
from pool_processes import H100_X1, gateway, intervals, join, model, owned_on, run, started
from tornado.httpclient import HTTPClientError

__all__ = ["started"]  # a fixture, used by name


def test_a_kernel_that_dies_is_reported_dead_and_no_longer_billed(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    kernel_id = str(gw.create(name=H100_X1)["id"])
    pid = int(run(gw, kernel_id, "import os; print(os.getpid())"))

    async def killed_under_an_open_websocket() -> tuple[Any, str, float]:
        sock = await KernelSocket.open(gw.url, gw.token, kernel_id)
        await sock.kernel_info()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while await asyncio.wait_for(sock.conn.read_message(), 30) is not None:
            pass  # what the kernel said before it died
        return sock.conn.close_code, sock.conn.close_reason or "", time.monotonic() - killed

    code, reason, after = asyncio.run(killed_under_an_open_websocket())
    # The client learns that the kernel ended, not that a connection dropped.
    assert code == 1011 and "kernel ended" in reason and "process ended" in reason, (code, reason)
    assert after < 15, after
    dead = model(gw, kernel_id)
    assert dead["execution_state"] == "dead" and dead["gpupool"]["state"] == "dead", dead
    assert "SIGKILL" in dead["gpupool"]["reason"], dead
    # Billing ended: the interval is closed as died, and the billed time stops growing.
    [row] = intervals(gw, kernel_id)
    assert row["end_reason"] == "died" and row["end"] is not None, row
    billed = dead["gpupool"]["billed_seconds"]
    time.sleep(1.0)
    assert model(gw, kernel_id)["gpupool"]["billed_seconds"] == billed
    # Its GPU is back in the pool, and nothing of it runs on the host.
    assert next(g for g in gw.call("GET", "/api/gpus").body if g["gpu_type"] == "H100")["free"] == 2
    assert owned_on(agent, kernel_id) == []
    # A new connection is refused with the reason; it does not wait.
    try:
        asyncio.run(asyncio.wait_for(run_code(gw.url, gw.token, kernel_id, "1"), 10))
        raise AssertionError("a dead kernel's websocket opened")
    except HTTPClientError as error:
        assert error.code == 404 and error.response is not None
        assert b"is dead" in error.response.body and b"SIGKILL" in error.response.body
    assert gw.sql("select state from kernels where id = :id", id=kernel_id) == [("dead",)]


def test_a_kernel_whose_host_stops_answering_closes_its_websockets(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started, host_timeout=2.0)
    agent = join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    kernel_id = str(gw.create(name=H100_X1)["id"])

    async def frozen_under_an_open_websocket() -> tuple[Any, str]:
        sock = await KernelSocket.open(gw.url, gw.token, kernel_id)
        await sock.kernel_info()
        os.kill(agent.proc.pid, signal.SIGSTOP)  # its connections stay open, and silent
        try:
            while await asyncio.wait_for(sock.conn.read_message(), 20) is not None:
                pass
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        return sock.conn.close_code, sock.conn.close_reason or ""

    code, reason = asyncio.run(frozen_under_an_open_websocket())
    assert code == 1011 and "kernel ended" in reason and "stopped answering" in reason, reason
    dead = model(gw, kernel_id)
    assert dead["gpupool"]["state"] == "dead", dead
    [row] = intervals(gw, kernel_id)
    assert row["end_reason"] == "host_lost" and row["end"] is not None, row


def test_a_kernel_shut_down_under_an_open_websocket_is_not_taken_for_dead(
    tmp_path: Path, started: list[Any]
) -> None:
    """The relay sees its host connection end while the owner's shutdown is under way: it says
    the kernel was shut down, and the ledger too, rather than that it died."""
    gw = gateway(tmp_path, started)
    join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    kernel_id = str(gw.create(name=H100_X1)["id"])

    async def shut_down_under_an_open_websocket() -> tuple[Any, str]:
        sock = await KernelSocket.open(gw.url, gw.token, kernel_id)
        await sock.kernel_info()
        reply = await asyncio.to_thread(gw.call, "DELETE", f"/api/kernels/{kernel_id}")
        assert reply.status == 204, reply.body
        while await asyncio.wait_for(sock.conn.read_message(), 20) is not None:
            pass
        return sock.conn.close_code, sock.conn.close_reason or ""

    code, reason = asyncio.run(shut_down_under_an_open_websocket())
    assert code == 1011 and reason == "the kernel ended: shut down by its owner", reason
    [row] = intervals(gw, kernel_id)
    assert row["end_reason"] == "shut_down", row
