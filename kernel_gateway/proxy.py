"""The kernel websocket at the gateway: a frame-for-frame relay to the kernel's host.

A client may connect while its kernel is still queued or starting: what it sends is held, in
order, and delivered once the kernel runs."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast
from urllib.parse import quote

from tornado import web
from tornado.httpclient import HTTPRequest
from tornado.iostream import IOStream
from tornado.websocket import (
    WebSocketClosedError,
    WebSocketHandler,
    WebSocketProtocol,
    WebSocketProtocol13,
)

from gpupool.wire import ENDED, MAX_MESSAGE_BYTES, V1_PROTOCOL, KernelState

from . import suspended_replies
from .base import tenant_of, token_of
from .errors import ApiError
from .splice import HostConnection, SplicingProtocol, connect_host
from .state import GatewayState
from .store import Tenant

log = logging.getLogger(__name__)
MAX_PENDING = 1000  # messages held for a kernel that is not running yet
HOST_CONNECT_TIMEOUT = 60.0  # seconds for the host's websocket handshake
STALE_WAIT = 10.0  # seconds a session's new connection waits for the relay it replaces to end
REPLACED = "another connection of the same session is in use"
MAX_SESSION_ID = 256  # characters of ?session_id= (Lab sends a 36-character uuid)


def close_reason(text: str) -> str:
    """A websocket close reason: at most 123 bytes of UTF-8, cut on a character."""
    return text.encode()[:123].decode(errors="ignore")


def read_session_id(handler: web.RequestHandler) -> str:
    """The client's ?session_id=, checked before the websocket opens; 400 when it is not text."""
    rule = (
        f"session_id must be at most {MAX_SESSION_ID} printable ASCII characters, such as a uuid."
    )
    try:
        session = handler.get_query_argument("session_id", "") or ""
    except web.HTTPError:  # not UTF-8 once decoded, such as %ff%fe
        raise ApiError(400, rule + ".") from None
    # ASCII: jupyter_client encodes the session as ASCII, and a host would fail with a 500.
    if len(session) > MAX_SESSION_ID or not (session.isascii() and session.isprintable()):
        raise ApiError(400, rule + ".")
    return session


class ChannelsHandler(WebSocketHandler):
    upstream: HostConnection | None = None
    relay: asyncio.Task[None] | None = None
    # Per (kernel id, session id): the connection relayed to the host, and the others; see _own.
    owners: dict[tuple[str, str], ChannelsHandler] = {}
    waiting: dict[tuple[str, str], list[ChannelsHandler]] = {}
    session_key: tuple[str, str] | None = None
    replaced = False
    older: ChannelsHandler | None = None  # the connection this one took its session from
    connecting: asyncio.Future[HostConnection] | None = None  # to the host
    watch: asyncio.Task[None] | None = None
    counted: bool = False  # counted among its tenant's open websockets
    tenant: Tenant
    session_id: str = ""

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.settings["gpupool"]
        return state

    async def get(self, kernel_id: str) -> None:
        try:
            tenant = tenant_of(self.state, token_of(self), self.request.remote_ip or "")
            kernel = self.state.kernels.get(tenant, kernel_id)
            if kernel.state == KernelState.DEAD:
                raise ApiError(404, f"kernel {kernel_id} is dead: {kernel.reason}")
            self.session_id = read_session_id(self)
        except ApiError as error:
            self.set_status(error.status)
            self.set_header("Content-Type", "application/json")
            if error.retry_after is not None:
                self.set_header("Retry-After", str(max(1, round(error.retry_after))))
            self.finish(json.dumps({"reason": self._reason, "message": error.message}))
            return
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            self.set_status(400)
            self.set_header("Content-Type", "application/json")
            message = "this is the kernel's websocket; open it with a websocket client."
            self.finish(json.dumps({"reason": "Bad Request", "message": message}))
            return
        self.kernel_id = kernel_id
        self.tenant = tenant
        self.pending: list[str | bytes] = []
        await super().get(kernel_id)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return V1_PROTOCOL if V1_PROTOCOL in subprotocols else None

    def open(self, kernel_id: str) -> None:
        self.set_nodelay(True)  # small frames must not wait 40 ms for Nagle
        refusal = self.state.limits.open_socket(self.tenant, self)
        if refusal is not None:
            self.close(1013, close_reason(refusal))  # 1013: try again later
            return
        self.counted = True
        live = self.state.kernels.live_of(kernel_id)
        live.connections += 1
        self.owned = asyncio.Event()
        self.session_key = (kernel_id, self.session_id) if self.session_id else None
        if self.session_key is None or self.session_key not in self.owners:
            self._own()
        else:
            self.waiting.setdefault(self.session_key, []).append(self)
        self.relay = asyncio.get_running_loop().create_task(self._relay())
        self.watch = asyncio.get_running_loop().create_task(self._watch_end())

    async def _watch_end(self) -> None:
        """A kernel that ends (dies, shut down, revoked) while its host keeps this relay's
        connection open: end the relay, which closes this websocket saying why."""
        kernels = self.state.kernels
        while self.ws_connection is not None:
            changed = kernels.live_of(self.kernel_id).changed
            if kernels.row(self.kernel_id).state in ENDED:
                if self.upstream is not None:
                    self.upstream.close()
                return
            await changed.wait()

    def _own(self) -> None:
        """Make this the session's connection to the host. A session id is the identity of the
        kernel's sockets at the host, which one connection at a time may hold; a second one
        waits here, unrelayed, until its client sends a message, and then takes the session
        over: the connection a client uses is the one it sends on. Neither the newest nor the
        oldest will do: stock JupyterLab in gateway mode keeps open to this gateway the
        connection that Chromium dropped (for want of a subprotocol) and opens another at once,
        with the same session id, and the two may arrive here in either order."""
        if self.session_key is None:
            self.owned.set()
            return
        older = self.owners.get(self.session_key)
        self.owners[self.session_key] = self
        self._stop_waiting()
        if older is not None:
            log.info("kernel %s: a session's other connection takes it over", self.kernel_id)
            older._give_up()
            self.older = older
        self.owned.set()

    def _stop_waiting(self) -> None:
        waiting = self.waiting.get(self.session_key or ("", ""), [])
        if self in waiting:
            waiting.remove(self)
            if not waiting:
                del self.waiting[self.session_key or ("", "")]

    def _give_up(self) -> None:
        self.replaced = True
        if self.upstream is not None:
            self.upstream.close()
        self.close(1000, REPLACED)

    async def _wait_running(self) -> Any:
        kernels = self.state.kernels
        while True:
            live = kernels.live_of(self.kernel_id)
            changed = live.changed
            kernel = kernels.row(self.kernel_id)
            if kernel.state == KernelState.RUNNING or kernel.state in ENDED:
                return kernel
            await changed.wait()

    async def _relay(self) -> None:
        await self.owned.wait()
        if self.older is not None:
            # The host must see the older connection's request before this one's: its relay and
            # any connection it has under way (which is closed when it completes) end first.
            older = [self.older.relay, self.older.connecting]
            await asyncio.wait([task for task in older if task is not None], timeout=STALE_WAIT)
            self.older = None
        # Connect to the kernel whenever it runs; a suspended kernel loses its host kernel but
        # keeps this websocket, and the next message resumes it.
        while await self._relay_once():
            pass

    async def _relay_once(self) -> bool:
        """Relay until the host side ends; True when the kernel was suspended meanwhile."""
        kernel = await self._wait_running()
        if self.replaced or self.ws_connection is None:
            return False
        if kernel.state != KernelState.RUNNING:
            self.close(1011, close_reason(f"the kernel ended: {kernel.reason}"))
            return False
        host = self.state.pool.hosts.get(kernel.host_id or "")
        if host is None:
            self.close(1011, "the kernel's host is not connected to the gateway; try again soon")
            return False
        url = host.url.replace("http", "ws", 1) + f"/api/kernels/{kernel.host_kernel_id}/channels"
        if self.session_id:
            url += f"?session_id={quote(self.session_id, safe='')}"
        limit = self.settings.get("websocket_max_message_size", MAX_MESSAGE_BYTES)
        self.connecting = connecting = asyncio.ensure_future(connect_host(
            # A host busy with a burst of handshakes may take longer than tornado's default 20 s.
            HTTPRequest(url, headers={"Authorization": f"token {host.token}"},
                        connect_timeout=HOST_CONNECT_TIMEOUT,
                        request_timeout=HOST_CONNECT_TIMEOUT),
            [self.selected_subprotocol] if self.selected_subprotocol else None,
            limit,
        ))  # fmt: skip
        try:
            # Shielded: a connection that completes after this client left is closed, not left
            # open at the host holding the session's identity.
            upstream = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            connecting.add_done_callback(_close_unused)
            raise
        except Exception as error:
            if self.replaced:
                return False
            log.warning("cannot reach kernel %s on %s: %s", self.kernel_id, host.name, error)
            self.close(1011, "the kernel's host cannot be reached; reconnect to try again")
            return False
        if self.replaced or self.ws_connection is None:
            upstream.close()
            return False
        upstream.stream.set_nodelay(True)
        # Held messages first, in order: what arrives during these awaits is appended to the
        # list and sent by this same loop, before on_message may write to the kernel directly.
        try:
            for message in self.pending:
                await upstream.write_message(message, binary=isinstance(message, bytes))
        except WebSocketClosedError:
            pass  # the host closed it meanwhile: its close code, read below, says why
        else:
            self.pending.clear()
        self.upstream = upstream
        upstream.relay = self  # from now on its data frames may go straight to the client
        live = self.state.kernels.live_of(self.kernel_id)
        while True:
            received = await upstream.read_message()  # what splice_to_client did not take
            if received is None:
                break
            live.touch()
            try:
                self.write_message(received, binary=isinstance(received, bytes))
            except WebSocketClosedError:
                break
        upstream.relay = None
        self.upstream = None
        # The host refused what this client sent (1007: malformed, 1009: over the host's size
        # limit, 1013: at its connection cap): its own words, which name the limit.
        default = {1007: "a message was malformed", 1009: "a message was over the host's size "
                   "limit", 1013: "the host has too many connections; try again later"}  # fmt: skip
        if upstream.close_code in default:
            reason = upstream.close_reason or default[upstream.close_code]
            self.close(upstream.close_code, reason.encode()[:123].decode(errors="ignore"))
            return False
        if self.ws_connection is None:
            return False
        # Ended by the host: suspended, or died (the host says so, or no longer knows it).
        kernel = await self.state.kernels.check_on_host(self.kernel_id)
        if kernel.state in (KernelState.SUSPENDED, KernelState.QUEUED, KernelState.STARTING):
            return True
        if self.ws_connection is None:
            return False
        if kernel.state != KernelState.RUNNING:
            self.close(1011, close_reason(f"the kernel ended: {kernel.reason}"))
            return False
        self.close(1011, "the kernel's connection ended; reconnect to the same kernel id")
        return False

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if type(protocol) is WebSocketProtocol13:
            return SplicingProtocol(self, False, protocol.params)
        return protocol

    def splice_target(self, opcode: int, masked: bool) -> IOStream | None:
        """The host's stream, when a whole binary message from the client may be written to it
        as it came (`splice`): the client's frame is masked, as the host wants from a client,
        and nothing is held or owed first. Else None: `on_message` does the rest."""
        upstream = self.upstream
        if opcode != 0x2 or not masked or upstream is None or upstream.protocol is None:
            return None
        if not self.owned.is_set() or self.session_key in self.waiting:
            return None  # the session changes hands first (on_message)
        live = self.state.kernels.live_of(self.kernel_id)
        if live.suspended or upstream.protocol.is_closing():
            return None  # held and resumed, or held for a reconnect (on_message)
        live.touch()
        live.last_client_message = live.last_activity
        return upstream.protocol.stream

    def splice_to_client(self, masked: bool) -> IOStream | None:
        """This client's stream, for a whole data frame from the host to be written to as it
        came (a host's frames are unmasked, as a client wants them); else None."""
        connection = self.ws_connection
        if masked or connection is None or connection.is_closing():
            return None
        self.state.kernels.live_of(self.kernel_id).touch()
        return cast("IOStream", connection.stream)

    def on_message(self, message: str | bytes) -> None:
        if not self.owned.is_set():
            self._own()
        elif self.session_key in self.waiting:  # connections of this session never used
            for other in self.waiting.pop(self.session_key):
                other._give_up()
        kernels = self.state.kernels
        live = kernels.live_of(self.kernel_id)
        live.touch()
        live.last_client_message = live.last_activity
        if not live.suspended and self.upstream is None and self.owned.is_set():
            # No host connection: the row decides. Beside replicas, another replica may have
            # suspended the kernel since this one last read it, and a message held here with
            # no resume would wait for ever.
            live.suspended = kernels.row(self.kernel_id).state == KernelState.SUSPENDED
        if live.suspended and self._answered_while_suspended(message):
            return
        if live.suspended:
            # Its host kernel is gone: hold this message, resume, and deliver it then.
            if self.upstream is not None:
                self.upstream.close()
                self.upstream = None
            self.state.suspensions.resume(self.kernel_id)
        elif self.upstream is not None:
            try:
                self.upstream.write_message(message, binary=isinstance(message, bytes))
                return
            except WebSocketClosedError:
                pass  # held, and sent again if the relay reconnects (a resume)
        if len(self.pending) >= MAX_PENDING:
            self.close(1008, "too many messages sent before the kernel started")
            return
        self.pending.append(message)

    def _answered_while_suspended(self, message: str | bytes) -> bool:
        """What a reconnecting tab asks of a suspended kernel is answered here (see
        suspended_replies.py): it must not resume the kernel and bill a GPU."""
        protocol = self.selected_subprotocol
        request = suspended_replies.answerable(message, protocol)
        info = self.state.kernels.row(self.kernel_id).checkpoint.get("kernel_info")
        if request is None or not info:  # (none kept by an older host: the kernel answers)
            asked = suspended_replies.request_of(message, protocol)
            log.info("kernel %s resumes for its client's %s", self.kernel_id,
                     str(asked[1].get("msg_type"))[:64] if asked else "message")  # fmt: skip
            return False
        channel, header = request
        for reply in suspended_replies.answer(channel, header, info, self.kernel_id, protocol):
            self.write_message(reply, binary=isinstance(reply, bytes))
        return True

    def on_close(self) -> None:
        key = self.session_key
        if key is not None and self.owners.get(key) is self:
            del self.owners[key]
            for other in self.waiting.pop(key, []):
                other._give_up()
        elif key is not None:
            self._stop_waiting()
        if self.counted:
            self.counted = False
            self.state.limits.closed_socket(self.tenant.id, self)
            self.state.kernels.live_of(self.kernel_id).connections -= 1
        if self.upstream is not None:
            self.upstream.close()
        for task in (self.relay, self.watch):
            if task is not None and not task.done():
                task.cancel()

    def check_origin(self, origin: str) -> bool:
        return True  # token auth, not cookies: a page on another origin cannot use it


def _close_unused(connecting: asyncio.Future[HostConnection]) -> None:
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().close()
