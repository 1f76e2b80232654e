"""Open kernel websockets per kernel, per tenant and on the whole host, against their caps, so
that one tenant at its cap leaves the host's files and ZMQ sockets to the others."""

from __future__ import annotations

from collections import Counter


class Connections:
    def __init__(self, per_kernel: int, per_tenant: int, total: int) -> None:
        self.per_kernel = per_kernel
        self.per_tenant = per_tenant
        self.total = total
        self.kernels: Counter[str] = Counter()
        self.tenants: Counter[str] = Counter()

    def refusal(self, kernel_id: str, tenant: str) -> str | None:
        """Why one more websocket to `kernel_id` of `tenant` is refused (a close reason of at
        most 123 bytes), or None when it may open."""
        open_now = sum(self.tenants.values())
        if self.kernels[kernel_id] >= self.per_kernel:
            return (
                f"too many connections to this kernel: {self.kernels[kernel_id]} open, "
                f"limit {self.per_kernel}; close some tabs"
            )
        if self.tenants[tenant] >= self.per_tenant:
            return (
                f"too many connections to your kernels on this host: {self.tenants[tenant]} "
                f"open, limit {self.per_tenant}; close some tabs"
            )
        if open_now >= self.total:
            return (
                f"this host has too many connections: {open_now} open, limit {self.total}; "
                "try again later"
            )
        return None

    def add(self, kernel_id: str, tenant: str) -> None:
        self.kernels[kernel_id] += 1
        self.tenants[tenant] += 1

    def remove(self, kernel_id: str, tenant: str) -> None:
        for counts, key in ((self.kernels, kernel_id), (self.tenants, tenant)):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]
