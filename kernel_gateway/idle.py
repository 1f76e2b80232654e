"""The idle watch: a kernel idle for its timeout gives its GPU back by itself.

Idle means (DESIGN.md): execution state idle, and no message from any client and no output
for `idle_timeout` seconds. A busy kernel is never idle."""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import select

from gpupool.wire import KernelState, parse_iso

from .store import Kernel
from .suspension import Suspensions

log = logging.getLogger(__name__)
TICK_SECONDS = 0.2


class IdleWatcher:
    def __init__(self, suspensions: Suspensions) -> None:
        self.suspensions = suspensions
        self.kernels = suspensions.kernels
        self._acting: set[str] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self.check()
            except Exception:
                log.exception("the idle watch failed this round; it goes on")

    async def check(self) -> None:
        now = time.time()
        with self.kernels.db() as s:
            running = s.scalars(select(Kernel).where(Kernel.state == KernelState.RUNNING)).all()
        for kernel in running:
            live = self.kernels.live_of(kernel.id)
            due = live.last_activity + kernel.idle_timeout
            if live.execution_state == "busy" or now < due or kernel.id in self._acting:
                continue
            self._acting.add(kernel.id)
            asyncio.get_running_loop().create_task(self._act(kernel, now))

    async def _act(self, kernel: Kernel, noticed: float) -> None:
        try:
            if await self._still_idle(kernel):
                why = f"idle for {kernel.idle_timeout:g} s"
                if self.kernels.idle_action == "cull":
                    await self.suspensions.cull(
                        kernel.id, f"culled after being {why}", since=noticed
                    )
                else:
                    await self.suspensions.suspend(
                        kernel.id, f"suspended after being {why}", since=noticed
                    )
        finally:
            self._acting.discard(kernel.id)

    async def _still_idle(self, kernel: Kernel) -> bool:
        """Ask the host, which sees every message of the kernel, before acting on heartbeats."""
        host = self.kernels.pool.hosts.get(kernel.host_id or "")
        if host is None or not kernel.host_kernel_id:
            return False
        try:
            model = await self.kernels.host_call(
                host, "GET", f"/api/kernels/{kernel.host_kernel_id}"
            )
        except Exception as error:
            log.warning("idle check of kernel %s failed: %s", kernel.id, error)
            return False
        live = self.kernels.live_of(kernel.id)
        live.execution_state = model.get("execution_state", live.execution_state)
        live.last_activity = max(live.last_activity, parse_iso(model["last_activity"]))
        return (
            live.execution_state != "busy"
            and time.time() >= live.last_activity + kernel.idle_timeout
        )
