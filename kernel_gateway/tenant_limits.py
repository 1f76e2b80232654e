"""Per-tenant caps on what a tenant holds open at the gateway: kernel websockets and HTTP
requests in flight, so that one tenant at its cap cannot take from another what they share
(the gateway's and the hosts' file descriptors, the gateway's time). It also knows each
tenant's open websockets, so that revoking a tenant can close them."""

from __future__ import annotations

from typing import Any

from .errors import ApiError
from .store import Tenant

DEFAULT_WEBSOCKETS = 128  # per tenant: Lab opens one per notebook; 0 means no limit
DEFAULT_REQUESTS = 100  # per tenant, in flight at once; 0 means no limit
RETRY_AFTER_SECONDS = 1.0


class TenantLimits:
    def __init__(
        self, websockets: int = DEFAULT_WEBSOCKETS, requests: int = DEFAULT_REQUESTS
    ) -> None:
        self.websockets = websockets
        self.requests = requests
        self.sockets: dict[int, set[Any]] = {}  # tenant id -> its open websocket handlers
        self.in_flight: dict[int, int] = {}  # tenant id -> its requests being answered

    def open_socket(self, tenant: Tenant, handler: Any) -> str | None:
        """Count a new websocket of the tenant's; the sentence to close it with when the tenant
        is at its cap (then it is not counted)."""
        held = self.sockets.setdefault(tenant.id, set())
        if self.websockets and len(held) >= self.websockets:
            return (
                f"tenant {tenant.name} has {len(held)} kernel websockets open, its limit; close "
                "some and reconnect."
            )
        held.add(handler)
        return None

    def closed_socket(self, tenant_id: int, handler: Any) -> None:
        held = self.sockets.get(tenant_id)
        if held is not None:
            held.discard(handler)
            if not held:
                del self.sockets[tenant_id]

    def begin_request(self, tenant: Tenant) -> None:
        """Count a request of the tenant's; 429 when it has its limit in flight already."""
        now = self.in_flight.get(tenant.id, 0)
        if self.requests and now >= self.requests:
            raise ApiError(
                429, f"tenant {tenant.name} has {now} requests in flight, its limit; wait for "
                "them to finish, then retry.", retry_after=RETRY_AFTER_SECONDS,
            )  # fmt: skip
        self.in_flight[tenant.id] = now + 1

    def end_request(self, tenant_id: int) -> None:
        now = self.in_flight.get(tenant_id, 0) - 1
        if now > 0:
            self.in_flight[tenant_id] = now
        else:
            self.in_flight.pop(tenant_id, None)
