"""Kernels started ahead of demand, already pinned to a GPU, so a request waits milliseconds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gpupool.wire import CPU, Shape

from .allocator import GpuAllocator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmKey:
    shape: Shape
    tenant: str | None  # set when kernels run as their tenant's user, so warm ones must too


StartWarm = Callable[[WarmKey], Awaitable[str]]
StopWarm = Callable[[str], Awaitable[None]]


class WarmPool:
    """Keeps `per_shape` idle kernels for each wanted key while GPUs are free for them.

    A warm kernel is handed to exactly one request and never comes back: a kernel that ends is
    shut down, and the pool starts a fresh one."""

    def __init__(
        self, allocator: GpuAllocator, start: StartWarm, stop: StopWarm, per_shape: int
    ) -> None:
        self.allocator = allocator
        self._start = start
        self._stop = stop
        self.per_shape = per_shape
        self.wanted: set[WarmKey] = set()
        self.ready: dict[WarmKey, list[str]] = {}
        self._refill: asyncio.Task[None] | None = None
        self._closed = False
        self._starting: tuple[WarmKey, asyncio.Future[None]] | None = None
        self._held_off = 0  # requests evicting warm kernels: refilling would race them

    def want_defaults(self, tenant: str | None) -> None:
        """Keep warm kernels of every GPU type (one GPU each) and a CPU one."""
        for gpu_type in self.allocator.types():
            self.wanted.add(WarmKey(Shape(gpu_type, 1), tenant))
        self.wanted.add(WarmKey(CPU, tenant))

    def count(self) -> int:
        return sum(len(ids) for ids in self.ready.values())

    def take(self, key: WarmKey, gpus: list[str] | None = None) -> str | None:
        """A warm kernel for `key` (on exactly `gpus` if given), removed from the pool."""
        ready = self.ready.get(key, [])
        for kernel_id in ready:
            if gpus is None or sorted(self.allocator.held_by(kernel_id)) == sorted(gpus):
                ready.remove(kernel_id)
                return kernel_id
        return None

    def holding(self, gpu_type: str | None) -> list[str]:
        """Warm kernels that hold GPUs of `gpu_type` (any type when None)."""
        return [
            kernel_id
            for key, ids in self.ready.items()
            for kernel_id in ids
            if key.shape.gpu_count and gpu_type in (None, key.shape.gpu_type)
        ]

    def starting(self, key: WarmKey | None = None) -> bool:
        """Whether a warm kernel (for `key`, or any) is being started right now."""
        return self._starting is not None and key in (None, self._starting[0])

    async def settle(self) -> None:
        """Wait until the warm kernel being started, if any, is ready (or has failed)."""
        if self._starting is not None:
            await asyncio.shield(self._starting[1])

    async def evict(self, kernel_ids: list[str]) -> None:
        """Shut down warm kernels so a request can have their GPUs; call within `hold_off`."""
        for ids in self.ready.values():
            for kernel_id in kernel_ids:
                if kernel_id in ids:
                    ids.remove(kernel_id)
        await asyncio.gather(*(self._stop(k) for k in kernel_ids))

    def hold_off(self) -> None:
        """Start no warm kernel until `resume`, so GPUs freed for a request stay free for it."""
        self._held_off += 1

    def resume(self) -> None:
        self._held_off -= 1
        self.refill_soon()

    def refill_soon(self) -> None:
        if self._closed or (self._refill and not self._refill.done()):
            return
        self._refill = asyncio.get_running_loop().create_task(self._fill())

    def _missing(self) -> WarmKey | None:
        if self._held_off:
            return None
        for key in sorted(self.wanted, key=lambda k: (k.shape.gpu_count == 0, str(k))):
            if len(self.ready.get(key, [])) >= self.per_shape:
                continue
            shape = key.shape
            if shape.gpu_count == 0 or len(self.allocator.free(shape.gpu_type)) >= shape.gpu_count:
                return key
        return None

    async def _fill(self) -> None:
        # One kernel at a time: starting kernels is CPU-heavy and requests come first.
        while not self._closed and (key := self._missing()) is not None:
            done = asyncio.get_running_loop().create_future()
            self._starting = (key, done)
            try:
                kernel_id = await self._start(key)
            except Exception:
                log.exception("could not start a warm kernel for %s; retrying in 5 s", key)
                await asyncio.sleep(5)
                continue
            finally:
                self._starting = None
                done.set_result(None)
            if self._closed:
                await self._stop(kernel_id)
                return
            self.ready.setdefault(key, []).append(kernel_id)
            log.info("warm kernel %s ready for %s", kernel_id, key.shape)

    async def close(self) -> None:
        self._closed = True
        if self._refill and not self._refill.done():
            # Let a start in flight finish rather than cancel it halfway: jupyter_client would
            # go on adding the half-started kernel after the cancel, unowned.
            try:
                await asyncio.wait_for(asyncio.shield(self._refill), 60)
            except (asyncio.TimeoutError, Exception):
                log.warning("a warm kernel start did not finish while stopping")
        ids = [k for ids in self.ready.values() for k in ids]
        self.ready.clear()
        await asyncio.gather(*(self._stop(k) for k in ids), return_exceptions=True)
