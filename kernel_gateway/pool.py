"""The GPU pool as the gateway sees it: hosts, their GPUs, who holds what, and placement."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gpupool.wire import KernelState, Shape

READINGS = ("utilization", "memory_used", "memory_total")  # what a tenant sees of its GPUs


@dataclass
class HostView:
    id: str
    name: str
    url: str
    token: str
    devices: dict[str, str] = field(default_factory=dict)  # GPU uuid -> type
    memory: dict[str, int] = field(default_factory=dict)  # GPU type -> bytes per GPU
    warm: dict[str, int] = field(default_factory=dict)  # GPU type -> GPUs held by warm kernels
    # GPU uuid -> its utilization, memory_used and memory_total at the last report
    readings: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.time)
    lost: bool = False
    salt: str = ""  # the token's salt in the database: a new one means the host registered again
    reported: list[dict[str, Any]] = field(default_factory=list)  # the GPUs as last reported
    held: dict[str, list[str]] = field(default_factory=dict)  # kernel id -> GPU uuids
    reserved: dict[str, Shape] = field(default_factory=dict)  # kernel id -> shape, while starting

    def update(self, gpus: list[dict[str, Any]]) -> None:
        self.reported = gpus
        self.devices = {g["uuid"]: g["gpu_type"] for g in gpus}
        self.memory = {g["gpu_type"]: int(g.get("memory_total", 0)) for g in gpus}
        self.readings = {g["uuid"]: {key: g.get(key) for key in READINGS} for g in gpus}
        self.warm = {}
        for g in gpus:
            if g.get("warm"):
                self.warm[g["gpu_type"]] = self.warm.get(g["gpu_type"], 0) + 1

    def total(self, gpu_type: str) -> int:
        return sum(1 for t in self.devices.values() if t == gpu_type)

    def free(self, gpu_type: str) -> int:
        used = {u for gpus in self.held.values() for u in gpus}
        free = sum(1 for u, t in self.devices.items() if t == gpu_type and u not in used)
        waiting = sum(s.gpu_count for s in self.reserved.values() if s.gpu_type == gpu_type)
        return free - waiting


class Pool:
    def __init__(self) -> None:
        self.hosts: dict[str, HostView] = {}
        # Hosts known from the database but not heard from since the gateway restarted: their
        # GPUs count for what the pool can serve, but nothing is placed on them until they
        # speak, since they may be gone.
        self.unheard: set[str] = set()

    def hold(self, rows: list[Any]) -> None:
        """Who holds and who waits for GPUs, from the database's running and starting kernels
        (`id, host_id, state, gpu_type, gpu_count, gpus` each), whichever gateway started them."""
        held: dict[str, dict[str, list[str]]] = {host_id: {} for host_id in self.hosts}
        reserved: dict[str, dict[str, Shape]] = {host_id: {} for host_id in self.hosts}
        for kernel_id, host_id, state, gpu_type, gpu_count, gpus in rows:
            if host_id not in self.hosts:
                continue
            if state == KernelState.RUNNING:
                held[host_id][kernel_id] = list(gpus or [])
            else:
                reserved[host_id][kernel_id] = Shape(gpu_type, gpu_count)
        for host_id, view in self.hosts.items():
            view.held, view.reserved = held[host_id], reserved[host_id]

    def live(self) -> list[HostView]:
        return [h for h in self.hosts.values() if not h.lost]

    def placeable(self) -> list[HostView]:
        return [h for h in self.live() if h.id not in self.unheard]

    def types(self) -> dict[str, dict[str, int]]:
        """Per GPU type: total, free, memory per GPU, and the most on any one host."""
        summary: dict[str, dict[str, int]] = {}
        for host in self.live():
            for gpu_type in sorted(set(host.devices.values())):
                entry = summary.setdefault(
                    gpu_type, {"total": 0, "free": 0, "memory": 0, "most": 0}
                )
                entry["total"] += host.total(gpu_type)
                entry["free"] += max(host.free(gpu_type), 0)
                entry["memory"] = host.memory.get(gpu_type, 0)
                entry["most"] = max(entry["most"], host.total(gpu_type))
        return summary

    def impossible(self, shape: Shape) -> str | None:
        """Why no host in the pool could ever serve `shape`, or None if one could."""
        if not shape.gpu_count:
            return None if self.live() else "no GPU host is connected to this gateway yet."
        types = self.types()
        have = ", ".join(f"{t} x{v['total']}" for t, v in types.items()) or "no GPUs yet"
        if shape.gpu_type not in types:
            return f"the pool has no {shape.gpu_type} GPU; it has {have}."
        most = types[shape.gpu_type]["most"]
        if shape.gpu_count > most:
            return (
                f"{shape.gpu_count} x {shape.gpu_type} asked for, but no host has more than "
                f"{most}; the pool has {have}."
            )
        return None

    def place_on(self, shape: Shape, host_id: str) -> HostView | None:
        """That host, if `shape` can start on it now."""
        host = self.hosts.get(host_id)
        if host is None or host not in self.placeable():
            return None
        if shape.gpu_count and (
            shape.gpu_type is None or host.free(shape.gpu_type) < shape.gpu_count
        ):
            return None
        return host

    def place(self, shape: Shape) -> HostView | None:
        """The host to start `shape` on now: best fit (fewest free GPUs that still fit, so big
        requests are not starved by fragmentation), preferring one with a warm kernel."""
        if not shape.gpu_count:
            live = self.placeable()
            return min(live, key=lambda h: len(h.held) + len(h.reserved)) if live else None
        assert shape.gpu_type is not None
        fits = [h for h in self.placeable() if h.free(shape.gpu_type) >= shape.gpu_count]
        if not fits:
            return None
        gpu_type = shape.gpu_type
        return min(fits, key=lambda h: (h.free(gpu_type), -h.warm.get(gpu_type, 0), h.name))
