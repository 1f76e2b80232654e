"""A host's heartbeat never fails as a whole: not for a kernel still starting (whose activity
jupyter_server sets a turn of the event loop after jupyter_client lists it), nor for one kernel
whose state cannot be read. Under 64 starts at once such a heartbeat failed, and the gateway took
the host for lost: every websocket open to it got a 404."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from conftest import free_port
from jupyter_server.services.kernels.kernelmanager import ServerKernelManager
from test_gateway_link import JOIN, RecordingGateway, wait

from gpu_host.allocator import GpuAllocator
from gpu_host.gpus import FakeInventory
from gpu_host.kernels import HostKernelManager, HostKernelSpecManager
from gpu_host.placement import KernelPlacement
from gpu_host.status import HostStatus
from gpu_host.tenants import TenantSpaces


class Unreadable(ServerKernelManager):
    @property
    def kernel_name(self) -> str:  # type: ignore[override]
        raise RuntimeError("a state no one foresaw")


def test_a_heartbeat_lists_every_kernel_whatever_its_state(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        inventory = FakeInventory("H100:1")
        km = HostKernelManager(kernel_spec_manager=HostKernelSpecManager())
        km.attach(GpuAllocator(inventory.devices()), TenantSpaces(tmp_path / "s", tmp_path / "r",
                                                                  False), 4096)  # fmt: skip
        space = await km.spaces.get(None)
        # One as jupyter_client lists it before jupyter_server has set its activity, one that
        # cannot be read at all, and one as the host makes them now (activity set at once).
        made, _, _ = km.pre_start_kernel("python3", {})
        kernels = {"bare": ServerKernelManager(kernel_name="python3"),
                   "unreadable": Unreadable(), "made": made}  # fmt: skip
        for kernel_id, kernel in kernels.items():
            km._kernels[kernel_id] = kernel
            km.placements[kernel_id] = KernelPlacement(kernel_id, [], None, space, True)
        return HostStatus(inventory, km.allocator, km, "http://127.0.0.1:1").heartbeat()

    beat = asyncio.run(scenario())
    states = {k["id"]: k["execution_state"] for k in beat["kernels"]}
    assert states == {"bare": "unknown", "unreadable": "unknown", "made": "starting"}
    made = next(k for k in beat["kernels"] if k["id"] == "made")
    assert made["last_activity"].endswith("Z")


def test_heartbeats_go_on_during_concurrent_starts(host_factory: Any) -> None:
    gateway = RecordingGateway(free_port())
    try:
        agent = host_factory(
            "--fake-gpus", "H100:8", "--no-isolate", "--warm-per-shape", "0", "--gateway",
            gateway.url, "--join-token", JOIN, "--heartbeat-seconds", "0.05",
        )  # fmt: skip
        wait(lambda: gateway.tokens, 20, "registration")
        token = gateway.tokens["host-1"]

        async def start_all() -> list[Any]:
            def start() -> Any:
                return agent.call("POST", "/api/kernels", {"gpu_type": "H100"}, token=token)

            return await asyncio.gather(*(asyncio.to_thread(start) for _ in range(8)))

        began = time.time()
        replies = asyncio.run(start_all())
        ended = time.time()
        assert [r.status for r in replies] == [201] * 8, [r.body for r in replies]
        during = [b for b in gateway.heartbeats if began < b["time"] < ended]
        assert len(during) >= 5, "heartbeats kept coming while the kernels started"
        assert any(k["execution_state"] == "starting" for b in during for k in b["kernels"])
        log = agent.log_path.read_text()
        assert "TraitError" not in log and "heartbeat together" not in log, log[-3000:]
        assert "unreachable" not in log, log[-3000:]
    finally:
        gateway.stop()
