"""A stand-in for nvidia-ml-py's `pynvml` on machines without an NVIDIA driver.

It answers the NVML calls gpupool makes over a described machine, the way the real library does:
the errors are the real `pynvml` error classes, the values are the real ctypes structures, and the
calls fail where the real ones fail (before `nvmlInit`, on MIG instances, on cards without MIG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import pynvml as real

GIB = 1024**3
MIB = 1024**2


@dataclass
class FakeGpu:
    """One device as NVML reports it: a whole card, or (inside `mig_slots`) one MIG instance."""

    name: str
    uuid: str
    memory_total: int
    memory_used: int = 0
    utilization: int = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    # None: the card cannot do MIG, so NVML answers NotSupported (consumer and pre-Ampere cards).
    mig_mode: int | None = None
    # One entry per MIG slot (A100 and H100 have 7); None is an empty slot.
    mig_slots: list[FakeGpu | None] = field(default_factory=list)
    is_mig_instance: bool = False


def mig_capable(card: FakeGpu, instances: list[FakeGpu | None] | None = None) -> FakeGpu:
    """`card` as an A100 or H100 is: MIG-capable with 7 slots; MIG enabled when given instances
    (listed first, None for an empty slot, the remaining slots empty), disabled otherwise."""
    card.mig_slots = [*(instances or []), *[None] * (7 - len(instances or []))]
    card.mig_mode = real.NVML_DEVICE_MIG_ENABLE if instances else real.NVML_DEVICE_MIG_DISABLE
    for instance in card.mig_slots:
        if instance is not None:
            instance.is_mig_instance = True
    return card


def _error(code: int) -> real.NVMLError:
    return real.NVMLError(code)  # the real constructor returns the matching subclass


class FakePynvml(ModuleType):
    """Use an instance wherever the `pynvml` module is expected."""

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        super().__init__("pynvml")
        # The real error classes and constants, so `except nvml.NVMLError_NotFound` means the same.
        for name, value in vars(real).items():
            if name.startswith(("NVMLError", "NVML_")):
                setattr(self, name, value)
        self.gpus = gpus
        self.init_error = init_error  # e.g. NVML_ERROR_LIBRARY_NOT_FOUND: nvmlInit fails with it
        self.init_count = 0  # NVML counts nvmlInit calls; nvmlShutdown undoes one

    def _check(self) -> None:
        if self.init_count == 0:
            raise _error(real.NVML_ERROR_UNINITIALIZED)

    def _whole(self, handle: FakeGpu) -> FakeGpu:
        self._check()
        if handle.is_mig_instance:
            raise _error(real.NVML_ERROR_NOT_SUPPORTED)
        return handle

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise _error(self.init_error)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check()
        if not 0 <= index < len(self.gpus):
            raise _error(real.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        self._check()
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        self._check()
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> real.c_nvmlMemory_t:
        self._check()
        used = handle.memory_used
        return real.c_nvmlMemory_t(
            total=handle.memory_total, free=handle.memory_total - used, used=used
        )

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> real.c_nvmlUtilization_t:
        self._check()
        # NVML cannot report utilization for a MIG instance, nor for a card with MIG enabled.
        if handle.is_mig_instance or handle.mig_mode == real.NVML_DEVICE_MIG_ENABLE:
            raise _error(real.NVML_ERROR_NOT_SUPPORTED)
        return real.c_nvmlUtilization_t(gpu=handle.utilization, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[object]:
        self._check()
        found = []
        for pid, used in handle.processes:
            info = real.c_nvmlProcessInfo_v3_t(pid=pid, usedGpuMemory=used or 0)
            process = real.nvmlStructToFriendlyObject(info)
            process.usedGpuMemory = used  # None where NVML cannot say, as the real call does
            found.append(process)
        return found

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> list[int]:
        card = self._whole(handle)
        if card.mig_mode is None:
            raise _error(real.NVML_ERROR_NOT_SUPPORTED)
        return [card.mig_mode, card.mig_mode]  # [current, pending]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeGpu) -> int:
        card = self._whole(handle)
        if card.mig_mode is None:
            raise _error(real.NVML_ERROR_NOT_SUPPORTED)
        return len(card.mig_slots)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeGpu, index: int) -> FakeGpu:
        card = self._whole(handle)
        if card.mig_mode is None:
            raise _error(real.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= index < len(card.mig_slots):
            raise _error(real.NVML_ERROR_INVALID_ARGUMENT)
        instance = card.mig_slots[index]
        if card.mig_mode != real.NVML_DEVICE_MIG_ENABLE or instance is None:
            raise _error(real.NVML_ERROR_NOT_FOUND)
        return instance
