"""jupyter_server's kernel websocket, with Nagle off, no IOPub rate limit, client activity, every
frame checked before it is parsed, and caps on open websockets per kernel, tenant and host."""

from __future__ import annotations

import asyncio
import time
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

import zmq
from jupyter_client.session import DELIM
from jupyter_core.utils import ensure_async
from jupyter_server._tz import utcnow
from jupyter_server.auth.decorator import ws_authenticated
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
from tornado import web
from tornado.websocket import WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from gpupool.wire import V1_PROTOCOL, frame_head, legacy_split, v1_head, v1_split

if TYPE_CHECKING:
    from .kernels import HostKernelManager

NOT_V1 = 1007  # websocket close code: the message's data is not what the protocol says
TOO_BIG = 1009  # websocket close code: a message over the size limit
DRAIN_SECONDS = 5.0  # the longest the rest of a message over the limit is read and dropped
TRY_LATER = 1013  # websocket close code: the server is at a limit; try again later
STALE_WAIT = 10.0  # seconds a session's new connection waits for the one it replaces to end


# What a legacy message that passed its framing check can still fail with while it is parsed.
PARSE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError)


class HostWebsocketConnection(ZMQChannelsWebsocketConnection):
    """Counts every message a client sends (shell, control, stdin) as kernel activity, checks
    each message's framing before anything parses it, reads nothing after a close, hands a v1
    message to its kernel socket at once, and keeps one connection per session."""

    replaced = False  # a newer connection of the same session took this one's place
    ended: asyncio.Event  # its websocket request is over: refused, or opened and closed

    def _refuse(self, error: Exception, framing: str) -> None:
        self.log.warning("kernel %s: a client sent a message that is not %s: %s",
                         self.kernel_id, framing, error)  # fmt: skip
        reason = f"not a {framing} message ({error}); nothing was sent"
        self.websocket_handler.close(NOT_V1, reason.encode()[:123].decode(errors="ignore"))

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

    async def prepare(self) -> None:
        """jupyter_server's, except that the wait for the kernel_info reply ends with it: that
        wait was a timer of 60 s (`kernel_info_timeout`) that kept the connection, its handler
        and its request alive for as long, also after the websocket closed."""
        await self._register_session()
        ready = getattr(self.kernel_manager, "ready", None)
        if ready is not None:
            try:
                await (ready if isinstance(ready, asyncio.Future) else asyncio.wrap_future(ready))
            except Exception as error:
                self.kernel_manager.execution_state = "dead"
                self.kernel_manager.reason = str(error)
                raise web.HTTPError(500, str(error)) from error
        deadline = time.monotonic() + self.kernel_info_timeout
        while not await ensure_async(self.kernel_manager.is_alive()):
            if time.monotonic() > deadline:
                raise TimeoutError("Kernel never reached an 'alive' state.")
            await asyncio.sleep(0.1)
        self.session.key = self.kernel_manager.session.key
        future = self.request_kernel_info()
        try:
            await asyncio.wait_for(asyncio.shield(future), self.kernel_info_timeout)
        except asyncio.TimeoutError:
            self.log.warning("Timeout waiting for kernel_info reply from %s", self.kernel_id)
            if not future.done():
                future.set_result({})

    def request_kernel_info(self) -> Any:
        """jupyter_server's, except that a connection waiting for another's kernel_info reply
        is not kept alive by it. That reply's future lives as long as the kernel, and
        jupyter_server hung a callback on it that holds the whole connection (its handler,
        request and buffers): every websocket opened while the first one waited stayed in
        memory after it closed, about 100 of every 100 opened at once."""
        shared: Future[Any] | None = getattr(self.kernel_manager, "_kernel_info_future", None)
        if shared is None or shared.done():
            return super().request_kernel_info()
        this = weakref.ref(self)

        def finish(future: Future[Any]) -> None:
            connection = this()
            if connection is not None:
                connection._finish_kernel_info(future.result())

        shared.add_done_callback(finish)
        return asyncio.wrap_future(self._kernel_info_future)

    def connect(self) -> asyncio.Future[None] | None:  # type: ignore[override]
        """jupyter_server's, except that a v1 connection receives its kernel's messages as ZMQ
        frames, not copies (`copy=False`), which `handle_outgoing_message` writes out as they
        are. Subscribed once jupyter_server has (a message between the two is a list of bytes,
        which is handled alike)."""
        connected = super().connect()
        if connected is not None and self.subprotocol == V1_PROTOCOL:

            def without_copies(_: Any) -> None:
                for stream in self.channels.values():
                    if not stream.closed():
                        stream.on_recv_stream(self.handle_outgoing_message, copy=False)

            connected.add_done_callback(without_copies)
        return connected

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        """A kernel's message to the client. In v1 (with tracebacks allowed, as here) nothing
        in it needs reading: its parts (ZMQ frames or bytes) go into one websocket frame as
        they are, after a header made here. jupyter_server's joins them into one v1 message
        and tornado joins that to its frame header: two copies of every byte of a pull."""
        if self.subprotocol != V1_PROTOCOL or not self.multi_kernel_manager.allow_tracebacks:
            if outgoing_msg and isinstance(outgoing_msg[0], zmq.Frame):
                outgoing_msg = [frame.bytes for frame in outgoing_msg]
            super().handle_outgoing_message(stream, outgoing_msg)
            return
        if isinstance(stream, str):
            stream = self.channels[stream]
        if stream.closed():
            self.disconnect()  # as jupyter_server's: the websocket's close is on its way
            return
        found = (
            i
            for i, part in enumerate(outgoing_msg)
            if len(part) == len(DELIM) and bytes(part) == DELIM
        )
        index = next(found, None)
        if index is None:
            self.log.warning("kernel %s: a message without a delimiter; dropped", self.kernel_id)
            return
        parts = [memoryview(part) for part in outgoing_msg[index + 2 :]]  # after the signature
        ws = self.websocket_handler.ws_connection
        if ws is None or ws.is_closing():
            return  # jupyter_server's would raise WebSocketClosedError, and log it
        channel = str(getattr(stream, "channel", "")).encode()
        out = cast("WebSocketProtocol13", ws).stream
        sizes = [part.nbytes for part in parts]
        head = v1_head(channel, sizes)
        out.write(frame_head(len(head) + sum(sizes)) + head)
        for part in parts:
            out.write(part)  # a large part is kept as a view until sent, not copied

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        ws = self.websocket_handler.ws_connection
        if ws is None or ws.is_closing() or not self.channels:
            return  # frames that were already on their way when the websocket closed
        self.kernel_manager.last_activity = utcnow()
        if self.subprotocol != V1_PROTOCOL:
            try:
                if isinstance(incoming_msg, bytes):
                    legacy_split(incoming_msg)  # its framing, before jupyter_server parses it
                super().handle_incoming_message(incoming_msg)
            except PARSE_ERRORS as error:
                self._refuse(error, "Jupyter (legacy framing)")
            return
        try:
            channel, parts = v1_split(incoming_msg)
        except ValueError as error:
            self._refuse(error, V1_PROTOCOL)
            return
        if self.multi_kernel_manager.allowed_message_types:
            try:  # its own filter, which parses the header; the framing is fine
                super().handle_incoming_message(incoming_msg)
            except PARSE_ERRORS as error:
                self._refuse(error, V1_PROTOCOL)
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
            except zmq.Again:
                pass
            else:
                # A ZMQ socket wakes its reader (the stream) by an edge-triggered file
                # descriptor, and this send, past the stream, can take the wakeup of a reply
                # that arrived meanwhile: it would wait unread until the next one (a client
                # waited forever for its kernel_info reply). The stream's own sends check.
                if stream.socket.get(zmq.EVENTS) & zmq.POLLIN:
                    stream.io_loop.add_callback(_read_waiting, stream)
                return
        self.session.send_raw(stream, parts)


def _read_waiting(stream: Any) -> None:
    if not stream.closed():
        stream.flush(zmq.POLLIN)


class SizeNamingProtocol(WebSocketProtocol13):
    """Tornado's websocket protocol, whose close for a message over the size limit names the
    host's limit (a client behind the gateway would otherwise not know whose limit it was)."""

    refused_big = False  # closed with 1009: the client may still be sending that message
    draining: asyncio.Future[None] | None = None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if code == TOO_BIG:
            mib = self.params.max_message_size / 2**20
            reason = f"a message was over {mib:g} MiB, the host's limit; send less per message"
            self.refused_big = True
        super().close(code, reason)

    def _abort(self) -> None:
        """Tornado tears the connection down right after its 1009 close, while the client is
        still sending the message refused: the unread bytes make the close a TCP reset, which
        can destroy the close frame before the client reads it (it then sees no code, no
        reason). Here the rest is read and dropped, DRAIN_SECONDS at most, before the teardown."""
        if self.draining is not None and not self.draining.done():
            return  # tornado calls this again as the frame loop ends; the drain tears down
        if not self.refused_big or self.stream is None or self.stream.closed():
            super()._abort()
            return
        self.client_terminated = True  # tornado's frame loop stops reading; this drains
        self.draining = asyncio.ensure_future(self._drain_then_abort())

    async def _drain_then_abort(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_SECONDS
        try:
            while (left := deadline - loop.time()) > 0:
                await asyncio.wait_for(self.stream.read_bytes(1 << 16, partial=True), left)
        except Exception:  # the client closed (as it should), or the time is up
            pass
        self.refused_big = False
        super()._abort()


class HostKernelWebsocketHandler(KernelWebsocketHandler):
    refusal: str | None = None  # why this websocket is closed as soon as it opens
    host_connection: HostWebsocketConnection | None = None  # once its session is registered

    @ws_authenticated
    async def get(self, kernel_id: str) -> None:
        km = cast("HostKernelManager", self.kernel_manager)
        # 404 before the upgrade, exactly as for an id that never existed.
        km.require_visible(kernel_id, alive=True)
        tenant = km.placements[kernel_id].space.tenant
        # A reconnect of an open session replaces that connection (jupyter_server closes the
        # stale one): it takes no new place.
        session = f"{kernel_id}:{self.get_argument('session_id', '')}"
        replacing = session in ZMQChannelsWebsocketConnection._open_sessions
        self.refusal = None if replacing else km.connections.refusal(kernel_id, tenant)
        if self.refusal:
            # Upgraded only to say why (a 1013 close), with no ZMQ socket opened for it.
            self.log.warning("kernel %s: websocket refused: %s", kernel_id, self.refusal)
            self.kernel_id = kernel_id
            await WebSocketHandler.get(self, kernel_id)
            return
        # Counted from before the kernel_info handshake: a burst of opens cannot pass the cap.
        km.connections.add(kernel_id, tenant)
        try:
            await super().get(kernel_id)  # returns when the websocket has closed
        finally:
            km.connections.remove(kernel_id, tenant)
            km.memory.soon()
            if self.host_connection is not None:
                self.host_connection.ended.set()
                self.host_connection = None  # a handler kept for replay must not keep it

    async def pre_get(self) -> None:
        await super().pre_get()  # makes self.connection and registers its session
        if self.host_connection is not None and self.host_connection.replaced:
            raise web.HTTPError(409, "a newer connection of the same session replaced this one")

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if isinstance(protocol, WebSocketProtocol13):
            return SizeNamingProtocol(self, False, protocol.params)
        return protocol

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        if self.refusal:
            return V1_PROTOCOL if V1_PROTOCOL in subprotocols else None
        return cast("str | None", super().select_subprotocol(subprotocols))

    async def open(self, kernel_id: str) -> None:
        # Nagle's algorithm holds small frames back for up to 40 ms: a cell's reply is small.
        self.set_nodelay(True)
        if self.refusal:
            self.close(TRY_LATER, self.refusal)
            return
        await super().open(kernel_id)

    def on_message(self, message: Any) -> None:
        if not self.refusal:
            super().on_message(message)

    def on_close(self) -> None:
        if not self.refusal:
            super().on_close()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        import json

        error = kwargs.get("exc_info", (None, None))[1]
        message = error.log_message if isinstance(error, web.HTTPError) else "unexpected error"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"reason": self._reason, "message": message}))
