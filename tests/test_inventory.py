"""The fake inventory: what `--fake-gpus` accepts, what it refuses, and what it reports."""

import subprocess
import sys

import pytest

from gpu_host.allocator import AllocationError, GpuAllocator
from gpu_host.gpus import GIB, FakeInventory, InventoryError, gpu_type_of, parse_fake_gpus
from gpupool.wire import Shape


def test_parse_counts_and_types():
    assert parse_fake_gpus("H100:4,A10G:2") == [("H100", 4), ("A10G", 2)]
    assert parse_fake_gpus(" h100 : 1 ") == [("H100", 1)]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "TYPE:COUNT"),
        ("H100", "TYPE:COUNT"),
        ("H100:", "whole number"),
        ("H100:0", "from 1 to 64"),
        ("H100:65", "from 1 to 64"),
        ("H100:-1", "whole number"),
        ("H100:two", "whole number"),
        ("B300:1", "unknown GPU type 'B300'"),
        ("H100:1,,A10G:1", "TYPE:COUNT"),
        ("H100:1,H100:2", "listed twice"),
        (":3", "TYPE:COUNT"),
    ],
)
def test_malformed_specs_are_refused_with_a_reason(spec, words):
    with pytest.raises(InventoryError, match=words):
        parse_fake_gpus(spec)


def test_fake_devices_have_real_sizes_and_stable_distinct_uuids():
    first = FakeInventory("H100:2,A10G:1", seed="host-a").devices()
    again = FakeInventory("H100:2,A10G:1", seed="host-a").devices()
    other = FakeInventory("H100:2,A10G:1", seed="host-b").devices()
    assert [g.uuid for g in first] == [g.uuid for g in again]
    assert len({g.uuid for g in first + other}) == 6
    assert all(g.uuid.startswith("GPU-") and len(g.uuid) == 40 for g in first)
    assert [g.gpu_type for g in first] == ["H100", "H100", "A10G"]
    assert first[0].memory_total == 80 * GIB and first[2].memory_total == 24 * GIB
    assert first[0].name == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(
    ("name", "gpu_type"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("Tesla T4", "T4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA H200", "H200"),
    ],
)
def test_gpu_type_from_nvml_name(name, gpu_type):
    assert gpu_type_of(name) == gpu_type


def test_allocator_never_gives_one_gpu_to_two_kernels():
    allocator = GpuAllocator(FakeInventory("H100:2,A10G:1", seed="s").devices())
    a = allocator.allocate("a", Shape("H100", 1))
    b = allocator.allocate("b", Shape("H100", 1))
    assert set(a).isdisjoint(b)
    with pytest.raises(AllocationError) as taken:
        allocator.allocate("c", Shape("H100", 1))
    assert taken.value.status == 409 and "only 0 free" in taken.value.message
    allocator.release("a")
    assert allocator.allocate("c", Shape("H100", 1)) == a


def test_allocator_shares_only_between_kernels_that_asked():
    allocator = GpuAllocator(FakeInventory("A10G:1", seed="s").devices())
    shared = allocator.allocate("a", Shape("A10G", 1), shared=True)
    assert allocator.allocate("b", Shape("A10G", 1), shared=True) == shared
    with pytest.raises(AllocationError):
        allocator.allocate("c", Shape("A10G", 1))
    exclusive = GpuAllocator(FakeInventory("A10G:1", seed="s").devices())
    exclusive.allocate("a", Shape("A10G", 1))
    with pytest.raises(AllocationError):
        exclusive.allocate("b", Shape("A10G", 1), shared=True)


def test_allocator_refuses_what_the_host_never_has():
    allocator = GpuAllocator(FakeInventory("H100:2", seed="s").devices())
    for shape, words in [
        (Shape("A100", 1), "no A100 GPU; it has H100 x2"),
        (Shape("H100", 3), "3 GPUs of H100 asked for"),
    ]:
        with pytest.raises(AllocationError, match=words) as refused:
            allocator.allocate("k", shape)
        assert refused.value.status == 400
    with pytest.raises(AllocationError, match="unknown GPU UUID GPU-nope") as unknown:
        allocator.allocate("k", Shape("H100", 1), uuids=["GPU-nope"])
    assert unknown.value.status == 400


def test_agent_refuses_malformed_fake_gpus_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "gpu_host", "--fake-gpus", "H100:lots", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--fake-gpus: count for H100 must be a whole number" in done.stderr
    assert "Traceback" not in done.stderr
