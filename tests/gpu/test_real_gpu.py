"""Checks that need a real NVIDIA GPU and driver; skipped, with NVML's reason, everywhere else."""

import asyncio
import json

import pytest
from kernel_ws import run_code

from gpu_host.nvml import open_nvml

inventory, reason = open_nvml()
if inventory is None:
    pytest.skip(f"needs an NVIDIA GPU: {reason}", allow_module_level=True)

# Run inside the kernel: what the CUDA driver itself lets this process see.
CUDA_CHECK = r"""
import ctypes, json, os
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0, "cuInit failed"
count, device = ctypes.c_int(), ctypes.c_int()
assert cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
uuid = (ctypes.c_ubyte * 16)()
get_uuid = getattr(cuda, "cuDeviceGetUuid_v2", None) or cuda.cuDeviceGetUuid  # v2 knows MIG
assert get_uuid(uuid, device) == 0
print(json.dumps({"count": count.value, "uuid": bytes(uuid).hex(),
                  "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


def uuid_hex(nvml_uuid: str) -> str:
    """`GPU-0a1b2c3d-...` or `MIG-0a1b2c3d-...` as the 32 hex digits CUDA reports."""
    return nvml_uuid.split("-", 1)[1].replace("-", "").lower()


def test_inventory_lists_the_real_devices():
    assert inventory is not None
    devices = inventory.devices()
    assert devices and [gpu.index for gpu in devices] == list(range(len(devices)))
    assert len({gpu.uuid for gpu in devices}) == len(devices)
    for gpu in devices:
        assert gpu.memory_total > 0 and 0 <= gpu.memory_used <= gpu.memory_total, gpu
        assert gpu.name and gpu.gpu_type, gpu
        if gpu.parent_uuid is None:
            assert gpu.uuid.startswith("GPU-"), gpu
            assert gpu.utilization is None or 0 <= gpu.utilization <= 100, gpu
        else:
            assert gpu.uuid.startswith("MIG-") and gpu.parent_uuid.startswith("GPU-"), gpu
            assert gpu.utilization is None, gpu


def test_a_kernel_sees_exactly_the_gpu_it_was_given(host_factory):
    assert inventory is not None
    agent = host_factory("--no-isolate")
    host = agent.call("GET", "/api/host").body
    assert host["source"] == "nvml", host
    assert [gpu["uuid"] for gpu in host["gpus"]] == [gpu.uuid for gpu in inventory.devices()]
    gpu_type = host["gpus"][0]["gpu_type"]

    kernel = agent.create(gpu_count=1, gpu_type=gpu_type)
    assigned = kernel["gpupool"]["gpus"]
    assert len(assigned) == 1 and kernel["gpupool"]["gpu_type"] == gpu_type, kernel

    out = asyncio.run(run_code(agent.url, agent.token, kernel["id"], CUDA_CHECK))
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["visible"] == ",".join(assigned), seen
    assert seen["count"] == 1, seen
    assert seen["uuid"] == uuid_hex(assigned[0]), (seen, assigned)
