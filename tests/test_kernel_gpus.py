"""What a tenant sees of its kernel's GPUs (issue 11, the Lab status bar and its details): the
host, when the GPUs were taken, and each GPU's utilization and memory as the host's heartbeats
report them. Only for the tenant's own kernels, and only while they hold GPUs."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kernel_ws import run_code
from test_gateway_faults import in_process_gateway

from kernel_gateway.pool import HostView

GIB = 1 << 30
H100_X1 = "python3-gpu-h100-x1"
HELD = ("host", "started", "gpus")


def seconds(iso_time: str) -> float:
    when = datetime.strptime(iso_time, "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=timezone.utc).timestamp()


def create(stack: Any, token: str, name: str) -> dict[str, Any]:
    reply = stack.call("POST", "/api/kernels", {"name": name}, token=token)
    assert reply.status == 201, reply.body
    return dict(reply.body)


def test_a_running_kernel_names_its_host_its_start_and_its_gpus(stack):
    a, b = stack.tenant("gpus-a"), stack.tenant("gpus-b")
    before = time.time()
    mine = create(stack, a, H100_X1)
    theirs = create(stack, b, "python3-gpu-a10g-x1")
    try:
        assert mine["gpupool"]["state"] == theirs["gpupool"]["state"] == "running"
        code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
        visible = asyncio.run(run_code(stack.url, a, mine["id"], code)).strip()
        g = stack.call("GET", f"/api/kernels/{mine['id']}", token=a).body["gpupool"]
        [host] = stack.call("GET", "/api/hosts", token=stack.admin_token).body
        assert g["host"] == host["name"]
        assert before - 1 <= seconds(g["started"]) <= time.time()
        # The fake inventory reports each GPU idle and empty: 0 % and 0 of 80 GiB used.
        assert g["gpus"] == [
            {"uuid": visible, "utilization": 0, "memory_used": 0, "memory_total": 80 * GIB}
        ]
        listed = {k["id"]: k for k in stack.call("GET", "/api/kernels", token=a).body}
        assert listed[mine["id"]]["gpupool"]["gpus"] == g["gpus"]
        # The other tenant sees its own A10G, and nothing of the H100 that a's kernel holds.
        seen_by_b = stack.call("GET", "/api/kernels", token=b).body
        assert [k["id"] for k in seen_by_b] == [theirs["id"]]
        [their_gpu] = seen_by_b[0]["gpupool"]["gpus"]
        assert their_gpu["memory_total"] == 24 * GIB and their_gpu["uuid"] != visible
        assert visible not in json.dumps(seen_by_b)
    finally:
        stack.call("DELETE", f"/api/kernels/{mine['id']}", token=a)
        stack.call("DELETE", f"/api/kernels/{theirs['id']}", token=b)


def test_a_queued_kernel_names_no_host_start_or_gpus(stack):
    a, c = stack.tenant("gpus-c"), stack.tenant("gpus-d")
    running = create(stack, a, H100_X1)  # one of the two H100s taken: two cannot start now
    try:
        queued = create(stack, c, "python3-gpu-h100-x2")
        try:
            assert queued["gpupool"]["state"] == "queued", queued
            again = stack.call("GET", f"/api/kernels/{queued['id']}", token=c).body
            for model in (queued, again):
                assert not set(HELD) & set(model["gpupool"]), model
        finally:
            stack.call("DELETE", f"/api/kernels/{queued['id']}", token=c)
    finally:
        stack.call("DELETE", f"/api/kernels/{running['id']}", token=a)


class StartsAtOnce:
    """Stands in for a host's kernel API: every start gets GPU-1."""

    async def __call__(
        self, host: HostView, method: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        if method != "POST":
            return {}
        return {"id": "on-host-1", "execution_state": "idle", "gpupool": {"gpus": ["GPU-1"]}}


def reading(uuid: str, utilization: int | None, used_gib: float) -> dict[str, Any]:
    return {"uuid": uuid, "gpu_type": "H100", "memory_total": 80 * GIB,
            "memory_used": int(used_gib * GIB), "utilization": utilization}  # fmt: skip


def test_each_heartbeat_updates_what_the_kernel_shows(tmp_path: Path) -> None:
    async def scenario() -> None:
        kernels, host, tenant = in_process_gateway(
            tmp_path, StartsAtOnce(), [reading("GPU-1", 0, 0), reading("GPU-2", 99, 70)]
        )
        kernel_id = (await kernels.create(tenant, H100_X1, {}))["id"]

        def shown() -> list[dict[str, Any]]:
            return list(kernels.model(kernels.row(kernel_id))["gpupool"]["gpus"])

        # GPU-2, busy for someone else, is never shown.
        assert shown() == [
            {"uuid": "GPU-1", "utilization": 0, "memory_used": 0, "memory_total": 80 * GIB}
        ]
        host.update([reading("GPU-1", 37, 12.1), reading("GPU-2", 99, 70)])
        assert shown() == [{"uuid": "GPU-1", "utilization": 37,
                            "memory_used": int(12.1 * GIB), "memory_total": 80 * GIB}]  # fmt: skip
        host.update([reading("GPU-1", None, 1)])  # a MIG instance cannot say how busy it is
        assert shown()[0]["utilization"] is None
        model = kernels.model(kernels.row(kernel_id))["gpupool"]
        assert model["host"] == "box" and model["state"] == "running"

    asyncio.run(scenario())
