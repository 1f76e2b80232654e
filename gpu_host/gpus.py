"""The GPUs of this machine as the agent sees them, and a fake inventory for GPU-less machines."""

from __future__ import annotations

import hashlib
import re
import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

GIB = 1024**3

# Memory of the fake GPUs, in GiB, as the real cards report it (the common SKU of each type).
FAKE_MEMORY_GIB: dict[str, int] = {
    "H200": 141,
    "H100": 80,
    "A100": 80,
    "L40S": 48,
    "A10G": 24,
    "L4": 24,
    "T4": 16,
    "V100": 32,
}
FAKE_NAMES: dict[str, str] = {
    "H200": "NVIDIA H200",
    "H100": "NVIDIA H100 80GB HBM3",
    "A100": "NVIDIA A100-SXM4-80GB",
    "L40S": "NVIDIA L40S",
    "A10G": "NVIDIA A10G",
    "L4": "NVIDIA L4",
    "T4": "Tesla T4",
    "V100": "Tesla V100-SXM2-32GB",
}
MAX_FAKE_GPUS = 64


@dataclass
class GpuProcess:
    pid: int
    used_memory: int | None


@dataclass
class Gpu:
    """One schedulable device: a whole GPU or one MIG instance."""

    index: int
    uuid: str
    name: str
    gpu_type: str
    memory_total: int
    memory_used: int
    utilization: int | None  # percent; None where NVML cannot say (MIG instances)
    processes: list[GpuProcess] = field(default_factory=list)
    parent_uuid: str | None = None  # set on MIG instances

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Inventory(Protocol):
    """What the agent needs to know about its GPUs."""

    source: str  # "nvml" or "fake", shown to operators

    def devices(self) -> list[Gpu]:
        """Every schedulable device, with current memory and utilization."""
        ...


class InventoryError(ValueError):
    """An inventory that cannot be built from what the operator gave; the message says why."""


def gpu_type_of(name: str) -> str:
    """The short type users ask for ("H100") from NVML's name ("NVIDIA H100 80GB HBM3")."""
    bare = re.sub(r"^(NVIDIA|Tesla|Quadro)\s+", "", name.strip())
    match = re.match(r"[A-Za-z]*\d+[A-Za-z]*", bare)
    return match.group(0).upper() if match else bare.split()[0].upper() if bare else "GPU"


def parse_fake_gpus(spec: str) -> list[tuple[str, int]]:
    """Parse `H100:4,A10G:2` into [("H100", 4), ("A10G", 2)], refusing anything unclear."""
    shapes: list[tuple[str, int]] = []
    known = ", ".join(sorted(FAKE_MEMORY_GIB))
    for part in spec.split(","):
        part = part.strip()
        gpu_type, sep, count_text = part.partition(":")
        gpu_type = gpu_type.strip().upper()
        if not part or not sep or not gpu_type:
            raise InventoryError(
                f"--fake-gpus {spec!r}: write TYPE:COUNT pairs separated by commas, "
                "for example H100:4,A10G:2."
            )
        if gpu_type not in FAKE_MEMORY_GIB:
            raise InventoryError(
                f"--fake-gpus: unknown GPU type {gpu_type!r}; known types: {known}."
            )
        if not count_text.strip().isdigit() or not 1 <= int(count_text) <= MAX_FAKE_GPUS:
            raise InventoryError(
                f"--fake-gpus: count for {gpu_type} must be a whole number from 1 to "
                f"{MAX_FAKE_GPUS}, not {count_text!r}."
            )
        if any(t == gpu_type for t, _ in shapes):
            raise InventoryError(
                f"--fake-gpus: {gpu_type} is listed twice; give one count per type."
            )
        shapes.append((gpu_type, int(count_text)))
    return shapes


def fake_uuid(seed: str, gpu_type: str, index: int) -> str:
    """A UUID in NVML's `GPU-xxxxxxxx-...` form that is the same every time for the same machine."""
    digest = hashlib.sha256(f"{seed}/{gpu_type}/{index}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


class FakeInventory:
    """GPUs that exist only on paper, with realistic names and memory, for machines without one."""

    source = "fake"

    def __init__(self, spec: str, seed: str | None = None) -> None:
        seed = seed or socket.gethostname()
        self._devices: list[Gpu] = []
        for gpu_type, count in parse_fake_gpus(spec):
            for _ in range(count):
                index = len(self._devices)
                self._devices.append(
                    Gpu(
                        index=index,
                        uuid=fake_uuid(seed, gpu_type, index),
                        name=FAKE_NAMES[gpu_type],
                        gpu_type=gpu_type,
                        memory_total=FAKE_MEMORY_GIB[gpu_type] * GIB,
                        memory_used=0,
                        utilization=0,
                    )
                )

    def devices(self) -> list[Gpu]:
        return [Gpu(**{**asdict(gpu), "processes": []}) for gpu in self._devices]


def describe(devices: list[Gpu]) -> str:
    """A one-line summary such as `2 x H100 (80 GiB), 1 x A10G (24 GiB)`."""
    counts: dict[tuple[str, int], int] = {}
    for gpu in devices:
        key = (gpu.gpu_type, round(gpu.memory_total / GIB))
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} x {t} ({m} GiB)" for (t, m), n in counts.items()) or "no GPUs"
