"""For nbclient or papermill with jupyter_server's `GatewayKernelManager` against gpupool.

jupyter_server's `GatewayKernelClient` (2.x) opens the kernel websocket with no headers at all,
so `GatewayClient.auth_token` never reaches the gateway, which refuses the websocket; nbclient then
fails with a bare `AssertionError`. The simpler path is the pool's kernelspec, started by the
`gpupool-provisioner` like a local kernel (`gpupool kernelspec sync`, then nbclient's default
kernel manager). Where `GatewayKernelManager` is wanted, give it this client:

    GatewayKernelManager(client_factory=TokenGatewayKernelClient)
"""

from __future__ import annotations

import functools
from typing import Any

from jupyter_server.gateway import managers
from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.gateway.managers import GatewayKernelClient


class TokenGatewayKernelClient(GatewayKernelClient):
    """jupyter_server's gateway kernel client, sending the gateway token on its websocket too."""

    async def start_channels(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        original = managers.websocket.create_connection
        headers = GatewayClient.instance().load_connection_args()["headers"]
        header = [f"{k}: {v}" for k, v in headers.items() if k == "Authorization"]
        # The upstream method calls create_connection before its first await, so the patch
        # is in place for exactly that call and undone before any other code runs.
        managers.websocket.create_connection = functools.partial(original, header=header)
        try:
            await super().start_channels(*args, **kwargs)
        finally:
            managers.websocket.create_connection = original
