"""The NVML inventory, against a stand-in for `pynvml` that fails the way the real one does, and
against the real `pynvml` on this machine (which may have no NVIDIA driver)."""

import json

import pynvml
import pytest
from fake_pynvml import GIB, MIB, FakeGpu, FakePynvml, mig_capable

from gpu_host.allocator import GpuAllocator
from gpu_host.gpus import FakeInventory, GpuProcess
from gpu_host.kernel_request import parse_kernel_request
from gpu_host.nvml import NvmlInventory, choose_inventory, open_nvml

H100_UUIDS = [
    "GPU-5b1c1a6e-0e0e-7d3c-1d1e-2f1a3b4c5d6e",
    "GPU-9f2d3c4b-5a69-7887-96a5-b4c3d2e1f0a9",
]
A100_UUID = "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"


def h100(uuid: str, used: int = 0, utilization: int = 0, processes=()) -> FakeGpu:
    card = FakeGpu("NVIDIA H100 80GB HBM3", uuid, 80 * GIB, used, utilization, list(processes))
    return mig_capable(card)  # MIG-capable, MIG disabled: listed whole


def mig_instance(profile: str, uuid: str, memory: int) -> FakeGpu:
    return FakeGpu(f"NVIDIA A100-SXM4-80GB MIG {profile}", uuid, memory, memory_used=13 * MIB)


def a100_with_two_instances() -> FakeGpu:
    card = FakeGpu("NVIDIA A100-SXM4-80GB", A100_UUID, 80 * GIB)
    first = mig_instance("1g.10gb", "MIG-11111111-2222-3333-4444-555555555555", 9856 * MIB)
    third = mig_instance("3g.40gb", "MIG-66666666-7777-8888-9999-000000000000", 40192 * MIB)
    return mig_capable(card, [first, None, third])  # slot 1 and slots 3-6 are empty


def one_clear_line(line: str) -> bool:
    return bool(line) and "\n" not in line and "Traceback" not in line


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver on this machine"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVIDIA driver is installed but not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "NVML could not start: Insufficient Permissions"),
    ],
)
def test_nvml_that_cannot_start_gives_no_inventory_and_one_line(code, words):
    inventory, line = open_nvml(FakePynvml([h100(H100_UUIDS[0])], init_error=code))
    assert inventory is None
    assert one_clear_line(line) and words in line, line


def test_whole_gpus_are_listed_with_what_nvml_reports():
    fake = FakePynvml(
        [
            h100(H100_UUIDS[0], used=3 * GIB, utilization=87, processes=[(4242, 3 * GIB)]),
            h100(H100_UUIDS[1], processes=[(77, None)]),  # NVML cannot always say how much
        ]
    )
    inventory, line = open_nvml(fake)
    assert isinstance(inventory, NvmlInventory) and line == "found 2 GPU device(s) through NVML"
    first, second = inventory.devices()
    assert [first.index, second.index] == [0, 1]
    assert [first.uuid, second.uuid] == H100_UUIDS
    assert first.name == "NVIDIA H100 80GB HBM3" and first.gpu_type == "H100"
    assert (first.memory_total, first.memory_used, first.utilization) == (80 * GIB, 3 * GIB, 87)
    assert first.processes == [GpuProcess(4242, 3 * GIB)]
    assert second.processes == [GpuProcess(77, None)] and second.memory_used == 0
    assert first.parent_uuid is None and second.parent_uuid is None


def test_a_mig_enabled_gpu_is_replaced_by_its_instances():
    inventory, line = open_nvml(FakePynvml([h100(H100_UUIDS[0]), a100_with_two_instances()]))
    assert inventory is not None and line == "found 3 GPU device(s) through NVML"
    whole, small, large = inventory.devices()
    assert whole.uuid == H100_UUIDS[0] and whole.utilization == 0
    assert [small.index, large.index] == [1, 2]
    assert small.uuid == "MIG-11111111-2222-3333-4444-555555555555"
    assert large.uuid == "MIG-66666666-7777-8888-9999-000000000000"
    assert small.parent_uuid == large.parent_uuid == A100_UUID
    assert (small.gpu_type, large.gpu_type) == ("A100-1G.10GB", "A100-3G.40GB")
    assert small.name == "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    assert (small.memory_total, small.memory_used) == (9856 * MIB, 13 * MIB)
    assert small.utilization is None and large.utilization is None  # NVML: NotSupported on MIG


@pytest.mark.parametrize(
    "body",
    [
        {"gpu_type": "A100-1g.10gb"},  # as NVIDIA writes the profile
        {"gpu_type": "a100-1G.10GB"},
        {"name": "python3-gpu-a100-1g.10gb-x1"},
    ],
)
def test_a_mig_instance_can_be_asked_for_by_type(body):
    inventory, _ = open_nvml(FakePynvml([a100_with_two_instances()]))
    assert inventory is not None
    allocator = GpuAllocator(inventory.devices())
    shape = parse_kernel_request(json.dumps(body).encode()).shape
    assert allocator.allocate("kernel-1", shape) == ["MIG-11111111-2222-3333-4444-555555555555"]


def test_a_card_without_mig_support_is_listed_whole():
    t4 = FakeGpu("Tesla T4", "GPU-3c4d5e6f-7081-92a3-b4c5-d6e7f8091a2b", 15360 * MIB, utilization=5)
    fake = FakePynvml([t4])
    inventory, _ = open_nvml(fake)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetMigMode(t4)  # as NVML answers for consumer and pre-Ampere cards
    assert inventory is not None
    [gpu] = inventory.devices()
    assert (gpu.name, gpu.gpu_type, gpu.uuid) == ("Tesla T4", "T4", t4.uuid)
    assert (gpu.memory_total, gpu.utilization, gpu.parent_uuid) == (15360 * MIB, 5, None)


def test_no_gpus_gives_no_inventory_and_one_line():
    inventory, line = open_nvml(FakePynvml([]))
    assert inventory is None
    assert one_clear_line(line) and "NVML found no NVIDIA GPU" in line


def test_nvml_failing_while_listing_gives_one_line(monkeypatch):
    fake = FakePynvml([h100(H100_UUIDS[0])])

    def lost(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(fake, "nvmlDeviceGetName", lost)
    inventory, line = open_nvml(fake)
    assert inventory is None
    assert one_clear_line(line) and line == "NVML started but could not list GPUs: GPU is lost"


def test_the_stand_in_fails_where_pynvml_fails():
    fake = FakePynvml([a100_with_two_instances()])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()  # before nvmlInit
    fake.nvmlInit()
    card = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.nvmlDeviceGetMigDeviceHandleByIndex(card, 1)  # an empty slot
    instance = fake.nvmlDeviceGetMigDeviceHandleByIndex(card, 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetUtilizationRates(instance)
    assert fake.nvmlDeviceGetMigMode(card) == [pynvml.NVML_DEVICE_MIG_ENABLE] * 2
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetName(card)


def test_choose_inventory_prefers_the_fake_spec():
    fake = FakePynvml([h100(H100_UUIDS[0])])
    inventory, line = choose_inventory("A10G:2", nvml=fake)
    assert isinstance(inventory, FakeInventory) and line == "using fake GPUs A10G:2 (--fake-gpus)"
    assert fake.init_count == 0  # NVML was not even started
    inventory, _ = choose_inventory(None, nvml=fake)
    assert isinstance(inventory, NvmlInventory)
    assert [g.uuid for g in inventory.devices()] == H100_UUIDS[:1]


def _real_nvml_reason() -> str:
    inventory, line = open_nvml()
    if inventory is not None:
        pytest.skip(f"this machine has an NVIDIA GPU ({line}); tests/gpu covers it")
    return line


def test_real_pynvml_without_a_gpu_says_why_in_one_line():
    line = _real_nvml_reason()
    assert one_clear_line(line), line
    assert "NVIDIA driver" in line or "no NVIDIA GPU" in line, line


def test_host_agent_without_a_gpu_says_so_and_still_serves(host_factory):
    reason = _real_nvml_reason()
    agent = host_factory("--no-isolate")
    assert f"gpus: {reason}; no GPUs" in agent.log().splitlines()
    assert "Traceback" not in agent.log()
    assert agent.call("GET", "/api/gpus").body == []
    assert agent.call("GET", "/api/host").status == 200
