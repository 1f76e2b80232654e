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
anew, or the gateway went away), the browser's websocket is closed and Lab reconnects.

jupyter_server watches every kernel's IOPub over ZMQ for its activity (`last_activity`,
`execution_state` in `/api/kernels`). For a pool kernel that would make the bridge relay every
IOPub message a second time, and this server decode each one again, on the same cores as the
relay: about 1 ms of a 5 ms `1+1`. So a pool kernel's activity is read from the frames this
relay passes down instead (`watch_pool_activity`): only their header, and a status message's
content. With no browser websocket open, Lab's model keeps its last state; the gateway's own
idle suspend does not depend on it."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

from jupyter_server._tz import utcnow
from jupyter_server.services.kernels.connection.base import BaseKernelWebsocketConnection
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from gpupool.wire import MAX_MESSAGE_BYTES, V1_PROTOCOL, legacy_split, v1_split

STATUS_BYTES = 4096  # a status message is a few hundred bytes; anything larger is not one


def pool_target(kernel: Any) -> tuple[str, str, str] | None:
    """(gateway URL, token, the gateway's kernel id) of a kernel the pool provisioner runs,
    else None (a local kernel, or one of another provisioner)."""
    target = getattr(getattr(kernel, "provisioner", None), "websocket_target", None)
    return target() if callable(target) else None


def watch_pool_activity(kernel_manager: Any) -> None:
    """The multi-kernel manager's IOPub watch, skipped for pool kernels (see the module): their
    activity comes from `record_activity` as their frames pass through this server."""
    original = kernel_manager.start_watching_activity
    if getattr(original, "skips_pool_kernels", False):
        return

    def start_watching_activity(kernel_id: str) -> None:
        kernel = kernel_manager.get_kernel(kernel_id)
        if pool_target(kernel) is None:
            original(kernel_id)
            return
        kernel.reason = ""
        kernel.last_activity = utcnow()

    start_watching_activity.skips_pool_kernels = True  # type: ignore[attr-defined]
    kernel_manager.start_watching_activity = start_watching_activity


def decoded(message: Any, v1: bool) -> tuple[str, dict, dict, dict] | None:
    """(channel, header, parent header, content) of a kernel message in the v1 or the legacy
    framing, else None."""
    try:
        if v1:
            channel, parts = v1_split(message)
            head, parent, _, content = (json.loads(bytes(part)) for part in parts[:4])
            return channel, head, parent, content
        if isinstance(message, bytes):
            message = bytes(legacy_split(message)[0])
        msg = json.loads(message)
        return str(msg.get("channel", "")), msg["header"], msg["parent_header"], msg["content"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class PoolKernelConnection(BaseKernelWebsocketConnection):
    """One browser websocket of a pool kernel, relayed to the gateway's websocket."""

    def __init__(self, target: tuple[str, str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_ws_protocol = V1_PROTOCOL
        self.url, self.token, self.remote_id = target
        self.upstream: WebSocketClientConnection | None = None
        self.v1 = True
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
            self.v1 = framing == V1_PROTOCOL
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
            self.record_activity(message)
        if not self.closed:
            reason = upstream.close_reason or "the pool kernel's websocket ended"
            self.log.info("gpupool: kernel %s: the gateway ended its websocket (%s, %s)",
                          self.kernel_id, upstream.close_code, reason)  # fmt: skip
            self.websocket_handler.close(1011, reason[:120])

    def record_activity(self, message: str | bytes) -> None:
        """As jupyter_server's own IOPub watch records it (see the module)."""
        small = len(message) <= STATUS_BYTES
        parsed = decoded(message, self.v1) if small else None
        manager, kernel = self.multi_kernel_manager, self.kernel_manager
        if parsed is None:  # output too large to be a status: activity all the same
            manager.last_kernel_activity = kernel.last_activity = utcnow()
            return
        channel, header, parent, content = parsed
        if channel != "iopub":
            return
        msg_type, parent_type = header.get("msg_type"), (parent or {}).get("msg_type")
        tracked = manager.track_message_type
        if tracked(msg_type) or tracked(parent_type) or kernel.execution_state == "busy":
            manager.last_kernel_activity = kernel.last_activity = utcnow()
        state = content.get("execution_state") if msg_type == "status" else None
        if not isinstance(state, str):
            return
        if tracked(parent_type):
            kernel.execution_state = state
        elif kernel.execution_state == "starting" and state != "starting":
            kernel.execution_state = "idle"

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
