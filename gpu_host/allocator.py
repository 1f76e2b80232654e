"""Which kernel holds which GPU: no two kernels share a GPU unless both asked to share."""

from __future__ import annotations

from gpupool.wire import CPU, Shape

from .gpus import Gpu


class AllocationError(Exception):
    """A GPU request this host cannot serve; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class GpuAllocator:
    """Hands out GPUs to holders (kernel ids). A GPU is held exclusively, or shared by holders
    that all asked for sharing."""

    def __init__(self, devices: list[Gpu]) -> None:
        self.devices = {gpu.uuid: gpu for gpu in devices}
        self._holders: dict[str, set[str]] = {uuid: set() for uuid in self.devices}
        self._shared: set[str] = set()  # holders that accept sharing their GPUs

    def types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for gpu in self.devices.values():
            counts[gpu.gpu_type] = counts.get(gpu.gpu_type, 0) + 1
        return counts

    def held_by(self, holder: str) -> list[str]:
        return [uuid for uuid, holders in self._holders.items() if holder in holders]

    def holders(self, uuid: str) -> set[str]:
        return set(self._holders.get(uuid, ()))

    def free(self, gpu_type: str | None = None) -> list[Gpu]:
        return [
            gpu
            for uuid, gpu in self.devices.items()
            if not self._holders[uuid] and gpu_type in (None, gpu.gpu_type)
        ]

    def _usable(self, uuid: str, shared: bool) -> bool:
        holders = self._holders[uuid]
        return not holders or (shared and holders <= self._shared)

    def check(self, shape: Shape, uuids: list[str] | None = None) -> None:
        """Refuse (400) a request this host could never serve, whatever is free."""
        if uuids is not None:
            unknown = [u for u in uuids if u not in self.devices]
            if unknown:
                raise AllocationError(
                    400, f"unknown GPU UUID {unknown[0]}; this host has: {', '.join(self.devices)}."
                )
            return
        if shape.gpu_count == 0:
            return
        types = self.types()
        have = ", ".join(f"{t} x{n}" for t, n in types.items()) or "no GPUs"
        if shape.gpu_type is not None and shape.gpu_type not in types:
            raise AllocationError(400, f"this host has no {shape.gpu_type} GPU; it has {have}.")
        most = types.get(shape.gpu_type, 0) if shape.gpu_type else max(types.values(), default=0)
        if shape.gpu_count > most:
            raise AllocationError(
                400,
                f"{shape.gpu_count} GPUs of {shape.gpu_type or 'one type'} asked for, but this "
                f"host has {have}.",
            )

    def allocate(
        self, holder: str, shape: Shape, uuids: list[str] | None = None, shared: bool = False
    ) -> list[str]:
        """Give `holder` the GPUs of `shape` (or exactly `uuids`); 409 when they are taken."""
        self.check(shape, uuids)
        if uuids is not None:
            taken = [u for u in uuids if not self._usable(u, shared)]
            if taken:
                raise AllocationError(409, f"GPU {taken[0]} is held by another kernel.")
            chosen = list(uuids)
        elif shape.gpu_count == 0:
            chosen = []
        else:
            candidates = [
                gpu.uuid
                for gpu in self.devices.values()
                if shape.gpu_type in (None, gpu.gpu_type) and self._usable(gpu.uuid, shared)
            ]
            if shape.gpu_type is None:
                # Without a type, all GPUs of one kernel must be of the same type.
                by_type: dict[str, list[str]] = {}
                for uuid in candidates:
                    by_type.setdefault(self.devices[uuid].gpu_type, []).append(uuid)
                candidates = next(
                    (c for c in by_type.values() if len(c) >= shape.gpu_count), candidates
                )
            if len(candidates) < shape.gpu_count:
                free = len(self.free(shape.gpu_type))
                raise AllocationError(
                    409,
                    f"{shape.gpu_count} x {shape.gpu_type or 'GPU'} asked for, but only {free} "
                    "free on this host; try again when a kernel ends.",
                )
            chosen = candidates[: shape.gpu_count]
        for uuid in chosen:
            self._holders[uuid].add(holder)
        if shared:
            self._shared.add(holder)
        return chosen

    def release(self, holder: str) -> list[str]:
        released = self.held_by(holder)
        for uuid in released:
            self._holders[uuid].discard(holder)
        self._shared.discard(holder)
        return released

    def shape_of(self, uuids: list[str]) -> Shape:
        if not uuids:
            return CPU
        return Shape(self.devices[uuids[0]].gpu_type, len(uuids))
