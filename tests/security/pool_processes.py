"""A gateway and its GPU hosts as separate processes on loopback (fake GPUs), as the tests of
tests/security start them, and what those tests ask of them."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import Gateway, HostAgent, start_gateway, start_host
from kernel_ws import run_code

H100_X1 = "python3-gpu-h100-x1"
HOST_TIMEOUT = 10.0  # long enough for a host held stopped for a few seconds not to be lost
CELL_TIMEOUT = 60.0  # a cell that does not answer by then hangs: the test fails, it never waits


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Gateways and hosts a test starts, stopped at its end whatever happened."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if thing.proc.poll() is None:
            os.kill(thing.proc.pid, signal.SIGCONT)  # a test may leave a host stopped
        thing.stop()


def gateway(
    tmp_path: Path, started: list[Any], *extra: str, port: int = 0,
    host_timeout: float = HOST_TIMEOUT,
) -> Gateway:  # fmt: skip
    gw = start_gateway(
        tmp_path, "--host-timeout", str(host_timeout), *extra, state=tmp_path / "gw", port=port
    )
    started.append(gw)
    return gw


def join(tmp_path: Path, started: list[Any], gw: Gateway, gpus: str = "H100:2") -> HostAgent:
    folder = tmp_path / f"host-{len(started)}"
    folder.mkdir()
    agent = start_host(
        folder, "--fake-gpus", gpus, "--no-isolate", "--gateway", gw.url,
        f"--join-token={gw.join_token}", "--heartbeat-seconds", "0.5",
    )  # fmt: skip
    started.append(agent)
    gw.wait_for(lambda: heard(gw, agent), 15, "the host to register")
    return agent


def heard(gw: Gateway, agent: HostAgent) -> bool:
    reply = gw.call("GET", "/api/hosts", token=gw.admin_token)
    return reply.status == 200 and any(h["url"] == agent.url and not h["lost"] for h in reply.body)


def restart(tmp_path: Path, started: list[Any], gw: Gateway, *extra: str) -> Gateway:
    """Kill the gateway (no clean shutdown) and start a new one on its port and database."""
    port = urlsplit(gw.url).port
    assert port
    gw.proc.kill()
    gw.proc.wait(10)
    again = gateway(tmp_path, started, *extra, port=port)
    again.token = gw.token
    return again


def model(gw: Gateway, kernel_id: str) -> dict[str, Any]:
    reply = gw.call("GET", f"/api/kernels/{kernel_id}")
    assert reply.status == 200, reply.body
    return dict(reply.body)


def state_of(gw: Gateway, kernel_id: str) -> str:
    return str(model(gw, kernel_id)["gpupool"]["state"])


def run(gw: Gateway, kernel_id: str, code: str) -> str:
    return asyncio.run(asyncio.wait_for(run_code(gw.url, gw.token, kernel_id, code), CELL_TIMEOUT))


def intervals(gw: Gateway, kernel_id: str) -> list[dict[str, Any]]:
    reply = gw.call("GET", f"/api/usage?kernel={kernel_id}")
    assert reply.status == 200, reply.body
    return list(reply.body["intervals"])


def assert_billed_once(gw: Gateway, kernel_id: str) -> None:
    """At most one interval open, and no two intervals of the kernel overlap."""
    rows = intervals(gw, kernel_id)
    assert sum(1 for r in rows if r["open"]) <= 1, rows
    for earlier, later in itertools.pairwise(rows):
        assert earlier["end"] is not None and earlier["end"] <= later["start"], rows


def owned_on(agent: HostAgent, kernel_id: str) -> list[str]:
    """The host kernels alive there for this gateway kernel."""
    return [k["id"] for k in agent.call("GET", "/api/kernels").body
            if (k.get("gpupool") or {}).get("owner") == kernel_id
            and k["execution_state"] != "dead"]  # fmt: skip
