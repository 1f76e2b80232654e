"""In Lab, a pool kernel's browser websocket relayed straight to the gateway's.

A pool kernel started by the `gpupool-provisioner` looks local to jupyter_server: its messages
would go browser → jupyter_server's ZMQ relay → the provisioner's bridge → the gateway → the
host. For the browser's own websocket this module skips the two middle hops, as kernels-mixer
does: the frames go to the gateway's websocket for the same kernel and back, unparsed, in the
framing the browser chose (v1, or legacy JSON). The bridge stays for everything else that speaks
ZMQ to the kernel (jupyter_server's activity watch, `jupyter execute`, consoles of other
clients). The tenant's token is used here, in the server, never sent to the browser.

The gateway holds what a client sends while the kernel is queued, starting or resuming, so this
relay needs no wait of its own; when the gateway ends its side (the kernel died, was restarted
anew, or the gateway went away), the browser's websocket is closed and Lab reconnects."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from jupyter_server.services.kernels.connection.base import BaseKernelWebsocketConnection
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from gpupool.wire import MAX_MESSAGE_BYTES, V1_PROTOCOL


def pool_target(kernel: Any) -> tuple[str, str, str] | None:
    """(gateway URL, token, the gateway's kernel id) of a kernel the pool provisioner runs,
    else None (a local kernel, or one of another provisioner)."""
    target = getattr(getattr(kernel, "provisioner", None), "websocket_target", None)
    return target() if callable(target) else None


class PoolKernelConnection(BaseKernelWebsocketConnection):
    """One browser websocket of a pool kernel, relayed to the gateway's websocket."""

    def __init__(self, target: tuple[str, str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_ws_protocol = V1_PROTOCOL
        self.url, self.token, self.remote_id = target
        self.upstream: WebSocketClientConnection | None = None
        self.closed = False
        self.reader: asyncio.Task[None] | None = None

    async def prepare(self) -> None:
        """Nothing to wait for: the gateway holds messages until the kernel runs."""

    async def connect(self) -> None:
        # tornado delivers no browser message before this returns, so none is lost meanwhile.
        self.websocket_handler.set_nodelay(True)
        url = self.url.replace("http", "ws", 1) + f"/api/kernels/{quote(self.remote_id)}/channels"
        if self.session_id:
            url += f"?session_id={quote(self.session_id)}"
        request = HTTPRequest(
            url, headers={"Authorization": f"token {self.token}"}, connect_timeout=30,
            request_timeout=30,
        )  # fmt: skip
        try:
            # The framing the browser got (v1, or legacy JSON for clients that ask for none),
            # asked of the gateway too, so frames pass as they are.
            framing = self.websocket_handler.selected_subprotocol
            self.upstream = await websocket_connect(
                request, subprotocols=[framing] if framing else None,
                max_message_size=MAX_MESSAGE_BYTES,
            )  # fmt: skip
        except Exception as error:
            self.log.warning("gpupool: kernel %s: no websocket at the gateway (%s)",
                             self.kernel_id, str(error).replace(self.token, "<token>"))  # fmt: skip
            self.websocket_handler.close(1011, "The GPU pool gateway did not answer; retrying.")
            return
        stream = getattr(self.upstream, "stream", None)
        if stream is not None:
            stream.set_nodelay(True)
        self.reader = asyncio.ensure_future(self.relay_down(self.upstream))

    async def relay_down(self, upstream: WebSocketClientConnection) -> None:
        """The gateway's frames to the browser, as they are; then the browser's socket ends."""
        while True:
            message = await upstream.read_message()
            if message is None or self.closed:
                break
            try:
                self.websocket_handler.write_message(message, binary=isinstance(message, bytes))
            except WebSocketClosedError:
                break
        if not self.closed:
            reason = upstream.close_reason or "the pool kernel's websocket ended"
            self.log.info("gpupool: kernel %s: the gateway ended its websocket (%s, %s)",
                          self.kernel_id, upstream.close_code, reason)  # fmt: skip
            self.websocket_handler.close(1011, reason[:120])

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        if self.upstream is None or self.closed:
            return
        try:
            self.upstream.write_message(incoming_msg, binary=isinstance(incoming_msg, bytes))
        except WebSocketClosedError:
            pass  # the reader closes the browser's side

    def handle_outgoing_message(self, stream: str, outgoing_msg: list[Any]) -> None:
        """Unused: nothing here speaks ZMQ."""

    def disconnect(self) -> None:  # type: ignore[override]  # the handler calls it unawaited
        self.closed = True
        if self.upstream is not None:
            self.upstream.close(1000, "the browser closed its websocket")
        if self.reader is not None:
            self.reader.cancel()
