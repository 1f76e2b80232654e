"""A host's heartbeat, registration or loss, reconciled with the gateway's kernels: activity and
deaths it reports, kernels that went missing, orphans it still runs, kernels that come back with
a host that was lost."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import select

from gpupool.wire import ENDED, KernelState, iso

from .kernels import GatewayKernels, time_of
from .ledger import HOST_LOST
from .pool import HostView
from .store import Kernel

log = logging.getLogger(__name__)


class HostReconciler:
    def __init__(self, kernels: GatewayKernels) -> None:
        self.kernels = kernels

    def host_reported(
        self, host: HostView, kernels: list[dict[str, Any]], at: float | None = None
    ) -> None:
        """Take in a host's view of its kernels (as of `at`): activity, and deaths. Those it
        reports alive are recorded as seen alive, so a death nobody saw bills up to here."""
        at = time.time() if at is None else at
        by_host_id = {k["id"]: k for k in kernels}
        alive: list[Kernel] = []
        with self.kernels.db() as s:
            ours = s.scalars(
                select(Kernel).where(Kernel.host_id == host.id, Kernel.state == KernelState.RUNNING)
            ).all()
        for kernel in ours:
            if kernel.host_kernel_id in self.kernels.stopping:
                continue  # being stopped by the gateway, which ends it with its own reason
            reported = by_host_id.get(kernel.host_kernel_id or "")
            if reported is None and kernel.id not in self.kernels.missed:
                # A report composed just before the host started this kernel can arrive after
                # the host's answer to the start: only a second report in a row is proof.
                self.kernels.missed.add(kernel.id)
                continue
            seen = kernel.last_seen_alive or at
            if reported is None:  # gone without a word: bill until it was last seen alive
                self.kernels.end(kernel.id, f"on host {host.name}: the host no longer runs it",
                          ended=seen)  # fmt: skip
                continue
            stamp = time_of(reported.get("last_activity"))
            if reported.get("execution_state") == "dead":
                # The host's time of death, within what this gateway saw (its clock may differ).
                died = min(max(stamp or at, seen), at)
                self.kernels.end(
                    kernel.id, f"on host {host.name}: {reported.get('reason')}", ended=died
                )
                continue
            self.kernels.missed.discard(kernel.id)
            alive.append(kernel)
            live = self.kernels.live_of(kernel.id)
            host.held.setdefault(kernel.id, list(kernel.gpus))
            live.execution_state = reported["execution_state"]
            live.last_activity = max(live.last_activity, stamp or 0.0)
        if alive:
            with self.kernels.db() as s:
                self.kernels.ledger.seen_alive(s, [k.id for k in alive], at)
                opened = self.kernels.ledger.ensure_open(s, alive, host.id, at)
                s.commit()
            if opened:
                log.warning("opened ledger intervals for %d running kernel(s) that had none",
                            len(opened))  # fmt: skip
        self._stop_orphans(host, kernels)

    def _stop_orphans(self, host: HostView, reported: list[dict[str, Any]]) -> None:
        """Stop host kernels this gateway started but no running kernel of its uses: a start in
        flight when the gateway crashed (the kernel was queued again, and started anew), a start
        whose answer never came, or a kernel shut down while its host could not be told. Their
        GPUs would stay taken with nobody to use or bill them."""
        owned = {
            str(m["id"]): str(m["gpupool"]["owner"])
            for m in reported
            if (m.get("gpupool") or {}).get("owner") and m.get("id") is not None
            and m.get("execution_state") != "dead"
        }  # fmt: skip
        if not owned:
            return
        with self.kernels.db() as s:  # one query per heartbeat, however many kernels it reports
            rows = s.scalars(select(Kernel).where(Kernel.id.in_(set(owned.values())))).all()
        kernels = {k.id: k for k in rows}
        for host_kernel_id, owner in owned.items():
            if host_kernel_id in self.kernels.stopping:
                continue  # being stopped already
            kernel = kernels.get(owner)
            if (
                kernel is not None
                and kernel.host_id == host.id
                and (
                    # its start (or restore) is in flight, at this gateway or another replica
                    kernel.state == KernelState.STARTING
                    or (
                        kernel.state == KernelState.RUNNING
                        and kernel.host_kernel_id == host_kernel_id
                    )
                )
            ):
                continue
            log.warning("stopping kernel %s on %s: no kernel of this gateway uses it now",
                        host_kernel_id, host.name)  # fmt: skip
            self.kernels.stopping.add(host_kernel_id)
            asyncio.get_running_loop().create_task(self._stop_orphan(host, host_kernel_id))

    async def _stop_orphan(self, host: HostView, host_kernel_id: str) -> None:
        try:
            await self.kernels.stop_on_host(host, host_kernel_id)
        finally:
            self.kernels.stopping.discard(host_kernel_id)

    def host_lost(self, host: HostView) -> None:
        with self.kernels.db() as s:
            ours = s.scalars(
                select(Kernel).where(
                    Kernel.host_id == host.id,
                    Kernel.state.in_([KernelState.RUNNING, KernelState.STARTING]),
                )
            ).all()
        seen = iso(host.last_seen)
        for kernel in ours:
            # Billing ends at the last heartbeat that reported it alive (before a gateway
            # restart, if the host never came back after it).
            self.kernels.end(
                kernel.id,
                f"its host {host.name} stopped answering (last heard {seen})",
                ended=kernel.last_seen_alive or host.last_seen,
                closing=HOST_LOST,
            )

    def reattach(self, host: HostView, kernels: list[dict[str, Any]]) -> None:
        """A host that comes back reports its kernels: those lost with it run again."""
        running = {k["id"]: k for k in kernels if k.get("execution_state") != "dead"}
        with self.kernels.db() as s:
            lost = s.scalars(
                select(Kernel).where(Kernel.host_id == host.id, Kernel.state == KernelState.DEAD)
            ).all()
        for kernel in lost:
            if kernel.host_kernel_id in running and "stopped answering" in kernel.reason:
                # A new interval: the time the host was away was never seen, so never billed.
                back = self.kernels.lifecycle.move(
                    kernel.id, KernelState.RUNNING, (KernelState.DEAD,), reason=""
                )
                if back is None:
                    continue
                host.held[kernel.id] = list(kernel.gpus)
                self.kernels.live_of(kernel.id).notify()
        # Kernels shut down (or ended for good) while the host was away still run there: stop
        # them, or their GPUs stay taken with nobody to use or bill them.
        with self.kernels.db() as s:
            over = s.scalars(
                select(Kernel).where(
                    Kernel.host_id == host.id,
                    Kernel.state.in_(ENDED),
                    Kernel.host_kernel_id.in_(list(running)),
                )
            ).all()
        for kernel in over:
            log.info("stopping kernel %s on %s: it ended while the host was away", kernel.id,
                     host.name)  # fmt: skip
            stop = self.kernels.stop_on_host(host, str(kernel.host_kernel_id))
            asyncio.get_running_loop().create_task(stop)
