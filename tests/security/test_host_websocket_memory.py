"""A closed websocket leaves nothing behind on the host: its handler, connection and registry
entries go when it closes, not 60 s later or with the kernel, and a kernel's backlog kept for a
reconnect is bounded. 1,000 websockets grew the host from 69 to 893 MiB, and 731 MiB stayed
after all had closed."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from kernel_ws import V1, KernelSocket, run_code

HERE = Path(__file__).resolve().parent


def probe_host(host_factory: Any, *args: str) -> Any:
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return host_factory(
        "--fake-gpus", "H100:1", "--no-isolate", "--warm-per-shape", "0",
        "--HostAgent.extra_services=gpu_host.handlers", "--HostAgent.extra_services=host_probe",
        *args, env={"PYTHONPATH": path},
    )  # fmt: skip


def probe(agent: Any) -> dict[str, Any]:
    reply = agent.call("GET", "/api/test/probe")
    assert reply.status == 200, reply.body
    return dict(reply.body)


def settled(agent: Any, kernel_id: str, timeout: float = 30) -> dict[str, Any]:
    """The probe once every websocket's close has run through (or the last one seen)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = probe(agent)
        done = seen["kernel_connections"].get(kernel_id) == 0 and not seen["per_kernel"]
        if (
            done and seen["connections"] == 0 and seen["handlers"] <= 1
        ) or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def test_200_websockets_opened_and_closed_leave_nothing_behind(host_factory):
    agent = probe_host(host_factory, "--max-websockets-per-kernel", "256")
    kernel_id = agent.create(name="python3")["id"]
    before = probe(agent)
    assert before["handlers"] == before["connections"] == 0, before

    async def burst() -> None:
        # All at once, so that most wait on the first one's kernel_info reply; both framings.
        socks = await asyncio.gather(
            *(KernelSocket.open(agent.url, agent.token, kernel_id, V1 if i % 2 else None)
              for i in range(200))
        )  # fmt: skip
        await asyncio.gather(*(s.kernel_info(120) for s in socks))
        for s in socks:
            s.close()

    for _ in range(2):
        asyncio.run(burst())
        after = settled(agent, kernel_id)
        assert after["per_kernel"] == {} and after["per_tenant"] == {}, after
        assert after["open_sessions"] == 0 and after["open_sockets"] == 0, after
        assert after["kernel_connections"] == {kernel_id: 0}, after
        assert after["connections"] == 0, after
        # The last websocket's ZMQ streams stay open to keep the kernel's messages for a
        # reconnect (jupyter_server's replay), and are registered under its handler's context.
        assert after["handlers"] <= 1, after
    assert asyncio.run(run_code(agent.url, agent.token, kernel_id, "print(1)")) == "1\n"


def test_a_kernel_backlog_without_websockets_is_bounded(host_factory):
    agent = probe_host(host_factory, "--HostKernelManager.max_replay_mb=1")
    kernel_id = agent.create(name="python3")["id"]
    # A cell that prints 10 KB a millisecond on and on, from a thread, after its tab closed.
    code = (
        "import threading, time\n"
        "def spam():\n"
        "    while True:\n"
        "        print('x' * 10000, flush=True); time.sleep(0.001)\n"
        "threading.Thread(target=spam, daemon=True).start()\n"
    )
    asyncio.run(run_code(agent.url, agent.token, kernel_id, code))
    grown = agent.wait_for(
        lambda: probe(agent)["replay_bytes"].get(kernel_id, 0) > 512 << 10, 30, "a backlog"
    )
    assert grown
    time.sleep(3)  # at about 10 MB a second
    backlog = probe(agent)["replay_bytes"][kernel_id]
    assert 512 << 10 < backlog <= (1 << 20) + 20000, backlog
