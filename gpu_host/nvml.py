"""The real inventory, read through NVML (nvidia-ml-py's `pynvml`)."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from .gpus import FakeInventory, Gpu, GpuProcess, Inventory, gpu_type_of

log = logging.getLogger(__name__)


def _text(value: bytes | str) -> str:
    # Old nvidia-ml-py releases return bytes, new ones str.
    return value.decode() if isinstance(value, bytes) else value


class NvmlInventory:
    """Every GPU NVML sees; a GPU with MIG enabled is replaced by its MIG instances."""

    source = "nvml"

    def __init__(self, nvml: ModuleType) -> None:
        self.nvml = nvml  # pynvml, already initialised

    def devices(self) -> list[Gpu]:
        nvml = self.nvml
        found: list[Gpu] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            whole = self._read(handle, len(found), None)
            migs = self._mig_devices(handle, whole)
            found.extend(migs or [whole])
        for position, gpu in enumerate(found):
            gpu.index = position
        return found

    def _read(self, handle: Any, index: int, parent: Gpu | None) -> Gpu:
        nvml = self.nvml
        name = _text(nvml.nvmlDeviceGetName(handle))
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError_NotSupported:
            utilization = None  # MIG instances and some older cards cannot report it
        try:
            processes = [
                GpuProcess(p.pid, p.usedGpuMemory)
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            ]
        except nvml.NVMLError_NotSupported:
            processes = []
        gpu_type = gpu_type_of(parent.name if parent else name)
        if parent is not None:
            # "NVIDIA A100-SXM4-40GB MIG 1g.5gb" is scheduled as type "A100-1G.5GB": upper case
            # like every type, since requests are upper-cased before they are matched.
            profile = name.rsplit("MIG", 1)[-1].strip().upper()
            gpu_type = f"{gpu_type}-{profile}" if profile else gpu_type
        return Gpu(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=name,
            gpu_type=gpu_type,
            memory_total=int(memory.total),
            memory_used=int(memory.used),
            utilization=utilization,
            processes=processes,
            parent_uuid=parent.uuid if parent else None,
        )

    def _mig_devices(self, handle: Any, parent: Gpu) -> list[Gpu]:
        nvml = self.nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError_NotSupported:
            return []  # not a MIG-capable card
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return []
        instances = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError_NotFound:
                continue  # an empty slot
            instances.append(self._read(mig, slot, parent))
        return instances


def open_nvml(nvml: ModuleType | None = None) -> tuple[NvmlInventory | None, str]:
    """Initialise NVML; returns the inventory, or None and one line saying why there is none."""
    if nvml is None:
        import pynvml

        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError_LibraryNotFound:
        return None, "no NVIDIA driver on this machine (NVML library not found)"
    except nvml.NVMLError_DriverNotLoaded:
        return None, "the NVIDIA driver is installed but not loaded (NVML: driver not loaded)"
    except nvml.NVMLError as error:
        return None, f"NVML could not start: {error}"
    inventory = NvmlInventory(nvml)
    try:
        count = len(inventory.devices())
    except nvml.NVMLError as error:
        return None, f"NVML started but could not list GPUs: {error}"
    if count == 0:
        return None, "NVML found no NVIDIA GPU on this machine"
    return inventory, f"found {count} GPU device(s) through NVML"


def choose_inventory(
    fake_gpus: str | None, nvml: ModuleType | None = None
) -> tuple[Inventory | None, str]:
    """The fake inventory when asked for, else NVML's; with the one line to show the operator."""
    if fake_gpus:
        return FakeInventory(fake_gpus), f"using fake GPUs {fake_gpus} (--fake-gpus)"
    return open_nvml(nvml)
