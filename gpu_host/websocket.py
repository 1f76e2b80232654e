"""jupyter_server's kernel websocket, with Nagle off, no IOPub rate limit and client activity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import zmq
from jupyter_server._tz import utcnow
from jupyter_server.auth.decorator import ws_authenticated
from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
from tornado import web

if TYPE_CHECKING:
    from .kernels import HostKernelManager

V1 = "v1.kernel.websocket.jupyter.org"


class HostWebsocketConnection(ZMQChannelsWebsocketConnection):
    """Counts every message a client sends (shell, control, stdin) as kernel activity, and
    hands a v1 message to its kernel socket at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Channels whose ZMQ stream has held a message back: later ones queue behind it.
        self.queued_channels: set[str] = set()

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        self.kernel_manager.last_activity = utcnow()
        if (
            self.subprotocol != V1
            or not self.channels
            or self.multi_kernel_manager.allowed_message_types
        ):
            super().handle_incoming_message(incoming_msg)
            return
        channel, parts = deserialize_msg_from_ws_v1(incoming_msg)
        stream = self.channels.get(channel)
        if stream is None:
            self.log.warning("No such channel: %r", channel)
            return
        if channel in self.queued_channels:
            self.session.send_raw(stream, parts)
            return
        # jupyter_server sends through the channel's ZMQStream, which only queues the message
        # and sends it on a later turn of the event loop: the socket takes it now, unless its
        # queue is full, and from then on this channel goes through the stream, in order.
        try:
            self.session.send_raw(stream.socket, parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.queued_channels.add(channel)
            self.session.send_raw(stream, parts)


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
