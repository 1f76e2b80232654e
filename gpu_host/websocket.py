"""jupyter_server's kernel websocket, with Nagle off, no IOPub rate limit and client activity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from jupyter_server._tz import utcnow
from jupyter_server.auth.decorator import ws_authenticated
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
from tornado import web

if TYPE_CHECKING:
    from .kernels import HostKernelManager


class HostWebsocketConnection(ZMQChannelsWebsocketConnection):
    """Counts every message a client sends (shell, control, stdin) as kernel activity."""

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        self.kernel_manager.last_activity = utcnow()
        super().handle_incoming_message(incoming_msg)


class HostKernelWebsocketHandler(KernelWebsocketHandler):
    @ws_authenticated
    async def get(self, kernel_id: str) -> None:
        # 404 before the upgrade, exactly as for an id that never existed.
        cast("HostKernelManager", self.kernel_manager).require_visible(kernel_id, alive=True)
        await super().get(kernel_id)

    async def open(self, kernel_id: str) -> None:
        # Nagle's algorithm holds small frames back for up to 40 ms: a cell's reply is small.
        self.set_nodelay(True)
        await super().open(kernel_id)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        import json

        error = kwargs.get("exc_info", (None, None))[1]
        message = error.log_message if isinstance(error, web.HTTPError) else "unexpected error"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"reason": self._reason, "message": message}))
