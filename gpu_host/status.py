"""What the agent reports about itself: its GPUs, who holds them, and each kernel's activity."""

from __future__ import annotations

import socket
import time
from typing import Any

from . import __version__
from .allocator import GpuAllocator
from .gpus import Inventory
from .kernels import HostKernelManager


class HostStatus:
    def __init__(
        self,
        inventory: Inventory,
        allocator: GpuAllocator,
        kernels: HostKernelManager,
        url: str,
        isolates: bool = False,
    ) -> None:
        self.inventory = inventory
        self.allocator = allocator
        self.kernels = kernels
        self.url = url
        self.isolates = isolates  # each tenant's kernels run as its own Unix user
        self.name = socket.gethostname()

    def gpus(self) -> list[dict[str, Any]]:
        devices = []
        for gpu in self.inventory.devices():
            holders = self.allocator.holders(gpu.uuid)
            placements = self.kernels.placements
            device = gpu.to_json()
            device["kernels"] = sorted(
                k for k in holders if k in placements and placements[k].claimed
            )
            device["warm"] = sum(
                1 for k in holders if k in placements and not placements[k].claimed
            )
            device["free"] = not holders
            devices.append(device)
        return devices

    def heartbeat(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "version": __version__,
            "isolates": self.isolates,
            "source": self.inventory.source,
            "time": time.time(),
            "gpus": self.gpus(),
            "kernels": self.kernels.activity(),
            "warm": self.kernels.warm.count(),
            "gpu_seconds": round(self.kernels.held_gpu_seconds(), 3),
        }
