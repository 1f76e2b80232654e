"""jupyter_server's kernel websocket, with Nagle off, no IOPub rate limit and client activity."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

import zmq
from jupyter_server._tz import utcnow
from jupyter_server.auth.decorator import ws_authenticated
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
from tornado import web

if TYPE_CHECKING:
    from .kernels import HostKernelManager

V1 = "v1.kernel.websocket.jupyter.org"
NOT_V1 = 1007  # websocket close code: the message's data is not what the protocol says
MAX_PARTS = 4096  # a v1 message's parts: header, parent, metadata, content and its buffers
STALE_WAIT = 10.0  # seconds a session's new connection waits for the one it replaces to end


def split_v1(message: bytes) -> tuple[str, list[memoryview]]:
    """A v1 message's channel and parts (views into it, not copies). Its part count and
    offsets are checked against its own length before use (jupyter_server's parser trusts
    them: a count of 2**60 keeps the host's loop busy for good); ValueError if it is not one."""
    if not isinstance(message, bytes):
        raise ValueError("it came as text; v1 messages are binary")
    view = memoryview(message)
    count = int.from_bytes(view[:8], "little") if len(view) >= 8 else 0
    if count > MAX_PARTS + 2:
        raise ValueError(f"it has more than {MAX_PARTS} parts")
    if not 6 <= count <= len(view) // 8 - 1:  # channel, header, parent, metadata, content
        raise ValueError("its part count does not fit the message")
    offsets = [int.from_bytes(view[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    if offsets[0] != 8 * (count + 1) or offsets != sorted(offsets) or offsets[-1] > len(view):
        raise ValueError("its offsets do not fit the message")
    try:
        channel = bytes(view[offsets[0] : offsets[1]]).decode()
    except UnicodeDecodeError:
        raise ValueError("its channel name is not UTF-8") from None
    return channel, [view[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]


class HostWebsocketConnection(ZMQChannelsWebsocketConnection):
    """Counts every message a client sends (shell, control, stdin) as kernel activity, hands a
    v1 message to its kernel socket at once, and keeps one connection per session."""

    replaced = False  # a newer connection of the same session took this one's place
    ended: asyncio.Event  # its websocket request is over: refused, or opened and closed

    async def _register_session(self) -> None:
        """The session id is the ZMQ identity of the connection's kernel sockets, so two live
        connections of one session leave one of them deaf (the kernel's ROUTER socket routes
        replies to whichever took the identity first). jupyter_server closes the older one, but
        that does nothing while the older one is still before its upgrade (waiting, as this one,
        for the kernel's info): both open, and the client's live one may be the deaf one. Here
        the older one is marked so that it never opens, and this one waits until it has ended."""
        self.ended = asyncio.Event()
        cast("HostKernelWebsocketHandler", self.websocket_handler).host_connection = self
        self.session_key = f"{self.kernel_id}:{self.session.session}"
        stale_handler = self._open_sessions.get(self.session_key)
        if self.kernel_id in self.multi_kernel_manager:
            self._open_sessions[self.session_key] = self.websocket_handler
        stale = getattr(stale_handler, "connection", None)
        if stale_handler is None or not isinstance(stale, HostWebsocketConnection):
            return
        self.log.warning("Replacing stale connection: %s", self.session_key)
        stale.replaced = True
        stale_handler.close(1000, "a newer connection of the same session replaced this one")
        try:
            await asyncio.wait_for(stale.ended.wait(), STALE_WAIT)
        except asyncio.TimeoutError:
            self.log.warning("kernel %s: the connection this one replaces has not ended after "
                             "%.0f s; going on", self.kernel_id, STALE_WAIT)  # fmt: skip

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        self.kernel_manager.last_activity = utcnow()
        if self.subprotocol != V1 or not self.channels:
            super().handle_incoming_message(incoming_msg)
            return
        try:
            channel, parts = split_v1(incoming_msg)
        except ValueError as error:
            self.log.warning("kernel %s: a client sent a message that is not v1: %s",
                             self.kernel_id, error)  # fmt: skip
            reason = f"not a {V1} message ({error}); nothing was sent"
            self.websocket_handler.close(NOT_V1, reason.encode()[:123].decode(errors="ignore"))
            return
        if self.multi_kernel_manager.allowed_message_types:
            super().handle_incoming_message(incoming_msg)  # its own filter; the format is fine
            return
        stream = self.channels.get(channel)
        if stream is None:
            self.log.warning("No such channel: %r", channel)
            return
        # jupyter_server sends through the channel's ZMQStream, which only queues the message
        # and sends it on a later turn of the event loop: the socket takes it now, unless its
        # queue is full or the stream still holds earlier messages (also those of a previous
        # connection of the same session, whose streams a reconnect takes over), which go first.
        if not stream.sending():
            try:
                self.session.send_raw(stream.socket, parts, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
        self.session.send_raw(stream, parts)


class HostKernelWebsocketHandler(KernelWebsocketHandler):
    host_connection: HostWebsocketConnection | None = None  # once its session is registered

    @ws_authenticated
    async def get(self, kernel_id: str) -> None:
        # 404 before the upgrade, exactly as for an id that never existed.
        cast("HostKernelManager", self.kernel_manager).require_visible(kernel_id, alive=True)
        try:
            await super().get(kernel_id)  # returns once the websocket has closed
        finally:
            if self.host_connection is not None:
                self.host_connection.ended.set()

    async def pre_get(self) -> None:
        await super().pre_get()  # makes self.connection and registers its session
        if self.host_connection is not None and self.host_connection.replaced:
            raise web.HTTPError(409, "a newer connection of the same session replaced this one")

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
