"""Suspend, resume and cull: a running kernel gives its GPUs back when idle (its namespace saved
on its host) or when its tenant reaches its budget, and comes back on its next client message."""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import select

from gpupool.wire import KernelState

from .kernels import GatewayKernels
from .ledger import BUDGET, CULLED, SUSPENDED
from .pool import HostView
from .store import Kernel, Tenant
from .suspended_replies import kept_kernel_info

log = logging.getLogger(__name__)
RUNNING = KernelState.RUNNING


class Suspensions:
    def __init__(self, kernels: GatewayKernels) -> None:
        self.kernels = kernels

    async def suspend(
        self, kernel_id: str, why: str, closing: str = SUSPENDED, since: float | None = None
    ) -> None:
        """Save the namespace, give the GPUs back, stop billing; the id and websocket stay.

        Billing ends at `since` (when the idle watch found the kernel idle past its deadline),
        else when the suspend begins: the seconds the checkpoint takes are the pool's, not the
        tenant's. If a client speaks meanwhile, nothing is closed and the kernel stays."""
        kernel = self.kernels.row(kernel_id)
        host = self.kernels.pool.hosts.get(kernel.host_id or "")
        if kernel.state != KernelState.RUNNING or host is None or not kernel.host_kernel_id:
            return
        kernels = self.kernels
        if not kernels.lifecycle.claim(kernel_id, kernels.owner, kernels.lease_seconds, RUNNING):
            return  # another gateway replica is suspending it (or it stopped running)
        try:
            await self._suspend(kernel, host, why, closing, since)
        finally:
            kernels.lifecycle.release(kernel_id, kernels.owner, RUNNING)

    async def _suspend(
        self, kernel: Kernel, host: HostView, why: str, closing: str, since: float | None
    ) -> None:
        kernel_id = kernel.id
        began = time.time() if since is None else min(since, time.time())
        live = self.kernels.live_of(kernel_id)
        live.suspending_since = began
        try:
            saved = await self.kernels.host_call(
                host, "POST", f"/api/kernels/{kernel.host_kernel_id}/checkpoint"
            )
        except Exception as error:
            live.suspending_since = None
            if live.last_client_message > began:  # restarted or interrupted by its user meanwhile
                log.info("kernel %s: checkpoint cut short by its user (%s)", kernel_id, error)
                return
            log.warning("could not checkpoint kernel %s (%s); culling it instead", kernel_id, error)
            await self.cull(kernel_id, f"{why}; its variables could not be saved ({error})")
            return
        finally:
            live.suspending_since = None
        if closing == SUSPENDED and live.last_client_message > began:
            # A client spoke during the checkpoint: not idle after all, and the checkpoint would
            # miss what that message did. It stays running; the watch looks again later.
            return
        not_saved = saved.get("not_saved", {})
        lost = f"; not saved: {', '.join(sorted(not_saved))}" if not_saved else ""
        # Suspended first, then the host kernel stops: its websocket relay sees why it ended.
        # Billing closes at `began`, and the kernel's own tokens go, in the same transaction.
        suspended = self.kernels.lifecycle.move(
            kernel_id, KernelState.SUSPENDED, (KernelState.RUNNING,), at=began, closing=closing,
            host_kernel_id=None, gpus=[],
            reason=f"{why}; its GPU was given back and {len(saved.get('saved', []))} variables "
                   f"saved{lost}. The next cell resumes it.",
            # The file is named by the host kernel's id (the host chose it), never by what the
            # tenant's kernel answered, so deleting it later cannot be aimed elsewhere.
            checkpoint={"host_id": host.id, "path": saved["path"], "not_saved": not_saved,
                        "file": f"{kernel.host_kernel_id}.pkl",
                        "kernel_info": kept_kernel_info(saved)},
        )  # fmt: skip
        if suspended is None:
            return  # shut down or lost meanwhile
        live.suspended = True
        # Its GPUs are the pool's from here. Done before the host is told, since a client
        # message during that call resumes the kernel, and the new start's own reservation
        # and GPUs must not be undone after it.
        for view in self.kernels.pool.hosts.values():
            view.held.pop(kernel_id, None)
        live.execution_state = "idle"
        live.notify()
        await self.kernels.stop_on_host(host, str(kernel.host_kernel_id))
        asyncio.get_running_loop().create_task(self.kernels.dispatch())

    async def cull(self, kernel_id: str, why: str, since: float | None = None) -> None:
        """Shut the kernel down; billing ends at `since` (when it was found idle), else now."""
        kernel = self.kernels.row(kernel_id)
        host = self.kernels.pool.hosts.get(kernel.host_id or "")
        if host is not None and kernel.host_kernel_id:
            await self.kernels.stop_on_host(host, kernel.host_kernel_id)
        self.kernels.end(kernel_id, why, ended=since, closing=CULLED)

    def resume(self, kernel_id: str) -> None:
        """Queue a suspended kernel for a GPU of the same shape; it restores, then runs."""
        again = (KernelState.SUSPENDED,)
        if self.kernels.lifecycle.move(kernel_id, KernelState.QUEUED, again, reason="") is None:
            return
        self.kernels.live_of(kernel_id).suspended = False
        self.kernels.live_of(kernel_id).notify()
        asyncio.get_running_loop().create_task(self.kernels.dispatch())

    async def enforce_budgets(self) -> float:
        """Stop the billing of tenants at their limit; the seconds until the next check."""
        due, wait = self.kernels.budgets.due()
        for tenant in due:
            await self.suspend_for_budget(tenant)
        return wait

    async def suspend_for_budget(self, tenant: Tenant) -> list[str]:
        """Suspend the tenant's GPU kernels now that its budget is reached (their variables
        are kept, as for an idle suspend); the ids it suspended."""
        why = self.kernels.budgets.refusal(tenant)
        if why is None:
            return []
        with self.kernels.db() as s:
            rows = s.scalars(
                select(Kernel).where(
                    Kernel.tenant_id == tenant.id,
                    Kernel.state == KernelState.RUNNING,
                    Kernel.gpu_count > 0,
                )
            ).all()
        for kernel in rows:
            log.warning("suspending kernel %s: %s", kernel.id, why)
            await self.suspend(kernel.id, f"suspended to end its GPU billing: {why}", BUDGET)
        return [kernel.id for kernel in rows]
