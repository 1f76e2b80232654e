"""Websocket frames moved between the gateway's two connections as they came.

The relay in `proxy.py` sits between a client's websocket (where the gateway is the server) and
the host's (where it is the client). A kernel message is one websocket frame, and a frame from
one side is already a valid frame for the other: a client's frame is masked, as the host wants
from the gateway (the key travels in the frame), and the host's is unmasked, as the client wants.
So a whole data frame is written to the other side's stream unchanged: its header, its mask key
and its payload, read and written once, never unmasked or masked again. Tornado's own path
(unmask, decode, `on_message`, mask again, join the header to the payload) cost about half the
gateway's time in a 100 MB `%%gpu` push.

What is still checked on every frame, before its payload is read: the reserved bits (no
extension is negotiated), the control-frame rules, the message size limit (1009, as tornado),
and the fragmentation rules. A frame that is not one whole binary message, or a text frame from
a client (whose UTF-8 tornado checks), or one the relay cannot pass on now (the kernel is not
running, messages are held, the session is changing hands), takes tornado's path as before.
The kernel message inside a frame is checked by the host (`gpupool.wire.v1_split`).

The other side's send buffer is bounded: once 4 MiB spliced to it wait there, the next frame's
payload is not read until they have gone, so a slow reader holds the sender back (TCP) instead
of the gateway holding the whole transfer, or a flood of output, in memory."""

from __future__ import annotations

from typing import Any, cast

from tornado import httpclient, httputil
from tornado.concurrent import Future
from tornado.iostream import IOStream, StreamClosedError
from tornado.util import _websocket_mask as websocket_mask  # C where built, as tornado's own
from tornado.websocket import WebSocketClientConnection, WebSocketProtocol13

BINARY = 0x2
TEXT = 0x1
CONTINUATION = 0x0
HELD_BYTES = 4 << 20  # spliced bytes unsent on the other side that hold back the next read


class SplicingProtocol(WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, with whole data frames spliced to the handler's other side
    (see the module). Every other frame is handled as tornado handles it. The handler's
    `splice_target(opcode, masked)` names, for each whole data frame, the stream to write it
    to as it is, or None for tornado's path."""

    held: Future[None] | None = None  # done when all spliced so far has left the other side
    held_bytes = 0  # spliced since `held` was last seen done

    async def _receive_frame(self) -> None:
        if self._decompressor is not None:  # never negotiated by the gateway; tornado's way
            await super()._receive_frame()
            return
        head = await self._read_bytes(2)
        fin, opcode = bool(head[0] & self.FIN), head[0] & self.OPCODE_MASK
        masked, length = bool(head[1] & 0x80), head[1] & 0x7F
        control = bool(opcode & 0x8)
        if head[0] & self.RSV_MASK or (control and (length >= 126 or not fin)):
            self._abort()  # an extension nobody agreed to, or a malformed control frame
            return
        extended = b""
        if length == 126:
            extended = await self._read_bytes(2)
        elif length == 127:
            extended = await self._read_bytes(8)
        if extended:
            length = int.from_bytes(extended, "big")
        fragments = self._fragmented_message_buffer
        if length + (len(fragments) if fragments is not None else 0) > self.params.max_message_size:
            self.close(1009, "message too big")
            self._abort()
            return
        mask = await self._read_bytes(4) if masked else b""
        if fin and fragments is None and opcode in (TEXT, BINARY):
            splice = getattr(self.handler, "splice_target", None)
            target = splice(opcode, masked) if splice is not None else None
            if target is not None:
                await self._splice(target, head + extended + mask, length)
                return
        data = await self._read_bytes(length)
        if masked:
            data = websocket_mask(mask, data)
        if opcode == CONTINUATION:
            if fragments is None:
                self._abort()  # nothing to continue
                return
            fragments.extend(data)
            if not fin:
                return
            opcode, data = cast(int, self._fragmented_message_opcode), bytes(fragments)
            self._fragmented_message_buffer = None
        elif not control:
            if fragments is not None:
                self._abort()  # a new message before the last one ended
                return
            if not fin:
                self._fragmented_message_opcode = opcode  # type: ignore[assignment]
                self._fragmented_message_buffer = bytearray(data)
                return
        handled = self._handle_message(opcode, data)
        if handled is not None:
            await handled

    async def _splice(self, target: IOStream, header: bytes, length: int) -> None:
        """Read the frame's payload and write it, after its header, to `target` unchanged."""
        held = self.held
        if held is not None and held.done():
            self.held, self.held_bytes = None, 0
        elif held is not None and self.held_bytes + length > HELD_BYTES:
            try:
                await held  # the other side has not taken what came before yet
            except StreamClosedError:
                pass
            self.held, self.held_bytes = None, 0
        payload = await self._read_bytes(length)
        self._message_bytes_in += length
        if target.closed():
            return  # that side is gone: its own close ends the relay
        try:
            target.write(header)
            self.held = target.write(payload)
        except StreamClosedError:
            return
        self.held_bytes += length


class HostConnection(WebSocketClientConnection):
    """The gateway's websocket to a kernel's host, whose data frames go straight to the client
    of `relay` once that is set (and its `splice_to_client` agrees)."""

    relay: Any = None  # the ChannelsHandler this connection serves

    def get_websocket_protocol(self) -> SplicingProtocol:
        return SplicingProtocol(self, mask_outgoing=True, params=self.params)

    def splice_target(self, opcode: int, masked: bool) -> IOStream | None:
        relay = self.relay
        return None if relay is None else cast("IOStream | None", relay.splice_to_client(masked))


def connect_host(
    request: httpclient.HTTPRequest, subprotocols: list[str] | None, max_message_size: int
) -> Future[HostConnection]:
    """`tornado.websocket.websocket_connect`, making a `HostConnection`."""
    request.headers = httputil.HTTPHeaders(request.headers)
    proxied = cast(
        httpclient.HTTPRequest,
        httpclient._RequestProxy(request, httpclient.HTTPRequest._DEFAULTS),
    )
    connection = HostConnection(
        proxied, subprotocols=subprotocols, max_message_size=max_message_size
    )
    return cast("Future[HostConnection]", connection.connect_future)
