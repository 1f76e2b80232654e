"""The local face of a pool kernel: a small process that binds the five ZMQ sockets of a
connection file on 127.0.0.1, as a kernel would, and relays every message to the pool kernel's
websocket at the gateway and back. Clients see an ordinary local kernel.

`python -m jupyter_ext.kernel_bridge -f CONNECTION_FILE --kernel-id ID` attaches to a kernel
the `gpupool-provisioner` started; `--kernel-name NAME` starts one itself (and deletes it when it
ends), for clients that launch a kernelspec's argv without jupyter_client's provisioners.

Frames travel as they are: the websocket's binary `v1.kernel.websocket.jupyter.org` messages
hold the same header, parent, metadata and content bytes as ZMQ's, so the bridge only checks the
client's signature and signs what it passes back (HMAC of the connection file's key). It reads
JSON only for routing: a request's header (its id, to send the reply to the client that asked)
and a reply's parent header. A gateway that does not speak v1 gets the legacy JSON framing.

What the bridge answers itself: heartbeats, and `shutdown_request` (the provisioner ends or
restarts the pool kernel through the gateway's REST API; the request is not passed on, since
the pool kernel must outlive its bridge on a restart). Idle suspend and resume happen behind
the websocket and need nothing here. When the websocket ends, the bridge asks the gateway about
the kernel: if it is dead or gone, the bridge exits 1 with the reason on stderr (jupyter_client
then sees a dead kernel); otherwise it reconnects, for `GPUPOOL_RECONNECT_S` (30) seconds.

The URL and token come from GPUPOOL_URL / GPUPOOL_TOKEN or `gpupool login`'s file, never from
the command line."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, cast
from urllib.parse import quote

import zmq
import zmq.asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from gpupool.loop import use_uvloop
from gpupool.wire import (
    MAX_MESSAGE_BYTES,
    V1_PROTOCOL,
    legacy_binary,
    legacy_split,
    v1_message,
    v1_split,
)

from . import credentials
from .errors import GatewayError
from .gateway_api import GatewayApi

DELIM = b"<IDS|MSG>"
ROUTES = 10_000  # requests remembered for routing their replies
RECONNECT_ENV = "GPUPOOL_RECONNECT_S"
QUEUE_POLL_S = 1.0
POLL_ENV = "GPUPOOL_BRIDGE_POLL_S"  # how often a bridge with no websocket asks if its kernel lives


_send = zmq.backend.Socket.send  # pyzmq's C send, without the per-part flag enums of its sugar
_recv, _get = zmq.backend.Socket.recv, zmq.backend.Socket.get  # the same, never a future
_MORE, _LAST = int(zmq.SNDMORE) | int(zmq.NOBLOCK), int(zmq.NOBLOCK)


def send_now(sock: zmq.Socket, parts: list[Any]) -> None:
    """Publish a multipart message at once: a PUB socket never blocks (at its high water mark
    it drops, as a kernel's does), so no future or loop turn is needed. Only for sockets that
    nothing reads from: see `reply_now`."""
    for part in parts[:-1]:
        _send(sock, part, _MORE, True, False)
    _send(sock, parts[-1], _LAST, True, False)


def reply_now(sock: zmq.asyncio.Socket, parts: list[Any]) -> None:
    """Send on a ROUTER socket that a task is reading from, through pyzmq's own send: a ZMQ
    socket wakes its reader by an edge-triggered file descriptor, and a send past pyzmq (as
    `send_now`) can take the wakeup of a request that arrived meanwhile, which then waits,
    unread, until the next one (a client waiting for its kernel_info reply waited forever).
    pyzmq checks for such a request after its send. A ROUTER never blocks: it drops what it
    cannot route."""
    sent = cast("asyncio.Future[Any]", sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False))
    if sent.done() and not sent.cancelled():
        sent.exception()  # retrieved: a dropped reply is not an error here


def say(text: str) -> None:
    print(f"gpupool: {text}", file=sys.stderr, flush=True)


def legacy_message(channel: str, parts: list[bytes]) -> str | bytes:
    """The same message in jupyter_server's legacy framing: JSON text, or (with buffers) its
    binary form: a 4-byte big-endian count, the offsets, the JSON, the buffers."""
    keys = ("header", "parent_header", "metadata", "content")
    msg: dict[str, Any] = {k: json.loads(p) for k, p in zip(keys, parts[:4], strict=True)}
    msg["channel"] = channel
    buffers = parts[4:]
    if not buffers:
        return json.dumps(msg)
    return legacy_binary([json.dumps(msg).encode(), *buffers])


def legacy_parts(data: str | bytes) -> tuple[str, list[bytes]]:
    """A legacy message as (channel, [header, parent, metadata, content, buffers...])."""
    buffers: list[bytes] = []
    if isinstance(data, bytes):
        pieces = legacy_split(data)
        data, buffers = bytes(pieces[0]).decode(), [bytes(piece) for piece in pieces[1:]]
    msg = json.loads(data)
    keys = ("header", "parent_header", "metadata", "content")
    return str(msg.get("channel", "")), [json.dumps(msg.get(k) or {}).encode() for k in keys] + [
        *buffers
    ]


class Bridge:
    def __init__(self, info: dict[str, Any], api: GatewayApi, kernel_id: str) -> None:
        self.info = info
        self.api = api
        self.kernel_id = kernel_id
        key = str(info.get("key", "")).encode()
        scheme = str(info.get("signature_scheme", "hmac-sha256"))
        digest = getattr(hashlib, scheme.split("-", 1)[-1])
        self.auth = hmac.new(key, digestmod=digest) if key else None
        self.session = uuid.uuid4().hex
        self.ws: ClientConnection | None = None
        self.v1 = True
        self.connected = asyncio.Event()
        self.done: asyncio.Future[int] | None = None
        self.routes: dict[bytes, OrderedDict[str, list[bytes]]] = {}
        self.reconnect_s = float(os.environ.get(RECONNECT_ENV, "30") or 30)
        self.poll_s = max(0.1, float(os.environ.get(POLL_ENV, "5") or 5))
        self.ctx: zmq.asyncio.Context = zmq.asyncio.Context()
        self.pending: set[asyncio.Future[None]] = set()  # interrupts under way
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.topic = f"kernel.{kernel_id}".encode()
        self.subscriptions = 0  # IOPub subscriptions of the clients connected now
        self.opening: asyncio.Future[None] | None = None  # the websocket's, once asked for

    # --- ZMQ side ---------------------------------------------------------------------------

    def bind(self) -> None:
        ip, transport = self.info.get("ip", "127.0.0.1"), self.info.get("transport", "tcp")
        if transport != "tcp":
            raise SystemExit(f"gpupool: the bridge speaks tcp, not {transport}")
        kinds = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER,
                 "iopub": zmq.XPUB}  # fmt: skip
        for name, kind in kinds.items():
            sock = self.ctx.socket(kind)
            sock.linger = 1000
            if kind == zmq.ROUTER:
                sock.router_handover = 1
            else:  # every subscribe and unsubscribe, those at a subscriber's end included
                sock.setsockopt(zmq.XPUB_VERBOSER, 1)
            sock.bind(f"tcp://{ip}:{self.info[f'{name}_port']}")
            self.sockets[name] = sock
            if kind == zmq.ROUTER:
                self.routes[name.encode()] = OrderedDict()
        threading.Thread(target=self._heartbeat, args=(ip,), daemon=True).start()

    def _heartbeat(self, ip: str) -> None:
        """Echo heartbeats, as ipykernel does, on a thread of their own."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.bind(f"tcp://{ip}:{self.info['hb_port']}")
        try:
            zmq.proxy(sock, sock)
        except zmq.ZMQError:
            pass

    def sign(self, parts: list[Any]) -> bytes:
        if self.auth is None:
            return b""
        check = self.auth.copy()
        for part in parts[:4]:
            check.update(part)
        return check.hexdigest().encode()

    async def from_client(self, name: str) -> None:
        """Client requests on one ROUTER socket, to the websocket."""
        sock = self.sockets[name]
        channel = name.encode()
        routes = self.routes[channel]
        while True:
            frames = await sock.recv_multipart()
            try:
                split = frames.index(DELIM)
            except ValueError:
                continue
            idents, signature, parts = frames[:split], frames[split + 1], frames[split + 2 :]
            if len(parts) < 4 or not hmac.compare_digest(self.sign(parts), signature):
                say(f"dropped a {name} message with a bad signature")
                continue
            try:
                header = json.loads(parts[0])
                msg_id = str(header["msg_id"])
            except (ValueError, KeyError, TypeError):
                continue
            if name == "control" and header.get("msg_type") == "shutdown_request":
                await self.shutdown_reply(idents, header, parts[3])
                continue
            routes[msg_id] = idents
            if len(routes) > ROUTES:
                routes.popitem(last=False)
            await self.to_gateway(name, parts)

    async def shutdown_reply(self, idents: list[bytes], request: dict, content: bytes) -> None:
        """Answer a shutdown request here and end the bridge; the provisioner (or, for a kernel
        this bridge started, the bridge itself) deals with the pool kernel."""
        try:
            restart = bool(json.loads(content).get("restart"))
        except (ValueError, AttributeError):
            restart = False
        header = {"msg_id": uuid.uuid4().hex, "msg_type": "shutdown_reply",
                  "session": self.session, "username": "gpupool", "version": "5.3",
                  "date": datetime.now(timezone.utc).isoformat()}  # fmt: skip
        body = {"status": "ok", "restart": restart}
        parts = [json.dumps(x).encode() for x in (header, request, {}, body)]
        reply_now(self.sockets["control"], [*idents, DELIM, self.sign(parts), *parts])
        self.stop()

    def subscribed(self) -> bool:
        """Whether any client takes IOPub now, from the subscriptions that came so far: the
        bridge neither signs nor sends IOPub messages that nobody would receive (a client that
        used only the shell channel, or whose subscribers have gone)."""
        sock = self.sockets["iopub"]
        while cast(int, _get(sock, zmq.EVENTS)) & zmq.POLLIN:
            try:
                self.count_subscription(cast(bytes, _recv(sock, zmq.NOBLOCK)))
            except zmq.Again:
                break
        return self.subscriptions > 0

    def count_subscription(self, event: bytes) -> None:
        if event[:1] == b"\x01":
            self.subscriptions += 1
        elif event[:1] == b"\x00":
            self.subscriptions = max(0, self.subscriptions - 1)

    async def to_client(self, channel: str, parts: list[Any]) -> None:
        if channel == "iopub":
            if self.subscribed():
                sock = self.sockets["iopub"]
                send_now(sock, [self.topic, DELIM, self.sign(parts), *parts])
            return
        signature = self.sign(parts)
        routes = self.routes.get(b"shell" if channel == "stdin" else channel.encode())
        if routes is None:
            return
        try:
            parent = json.loads(bytes(parts[1])) if len(parts[1]) > 2 else {}
            msg_id = str(parent.get("msg_id", ""))
        except (ValueError, AttributeError):
            return
        idents = routes.get(msg_id) if channel == "stdin" else routes.pop(msg_id, None)
        if idents is None:
            return  # a reply to someone else (the gateway's own kernel_info): nobody here waits
        reply_now(self.sockets[channel], [*idents, DELIM, signature, *parts])

    # --- websocket side ---------------------------------------------------------------------

    async def to_gateway(self, channel: str, parts: list[bytes]) -> None:
        self.want()
        while True:
            await self.connected.wait()
            ws = self.ws
            if ws is None:
                continue
            data = v1_message(channel, parts) if self.v1 else legacy_message(channel, parts)
            try:
                await ws.send(data)
                return
            except ConnectionClosed:
                self.connected.clear()  # the reader reconnects; this message goes after

    async def connect(self) -> None:
        url = (self.api.url.replace("http", "ws", 1) + f"/api/kernels/{quote(self.kernel_id)}"
               f"/channels?session_id={self.session}")  # fmt: skip
        ws = await connect(
            url,
            additional_headers={"Authorization": f"token {self.api.token}"},
            subprotocols=[Subprotocol(V1_PROTOCOL)],
            compression=None,
            max_size=MAX_MESSAGE_BYTES,
            open_timeout=30,
            ping_interval=20,
            ping_timeout=60,
            proxy=None,
        )
        self.v1 = ws.subprotocol == V1_PROTOCOL
        self.ws = ws
        self.connected.set()

    async def from_gateway(self) -> int:
        """Relay the websocket to the client; reconnect while the kernel lives. The exit code."""
        while True:
            ws = self.ws
            assert ws is not None
            try:
                async for data in ws:
                    if self.v1 and isinstance(data, bytes):
                        try:
                            channel, parts = v1_split(data)
                        except ValueError:
                            continue
                        await self.to_client(channel, parts)
                    else:
                        try:
                            channel, plain = legacy_parts(data)
                        except (ValueError, AttributeError):  # not a message: skipped
                            continue
                        await self.to_client(channel, plain)
            except ConnectionClosed:
                pass
            self.connected.clear()
            reason = ws.close_reason or f"code {ws.close_code}"
            code = await self.reconnect(reason)
            if code is not None:
                return code

    async def reconnect(self, reason: str) -> int | None:
        """After the websocket ended: None once open again, else the bridge's exit code."""
        deadline = time.monotonic() + self.reconnect_s
        last = reason
        while True:
            try:
                model = await asyncio.to_thread(self.api.kernel, self.kernel_id)
            except GatewayError as error:
                if error.status not in (0, 502, 503, 504):
                    say(f"the pool kernel's websocket ended ({reason}); "
                        + credentials.explain(error, self.api.url))  # fmt: skip
                    return 1
                model, last = {}, str(error)
            why = self.ended(model, reason)
            if why:
                say(why)
                return 1
            if model:
                try:
                    await self.connect()
                    return None
                except (OSError, InvalidStatus, TimeoutError) as error:
                    last = str(error)
            if time.monotonic() > deadline:
                say(f"lost the pool kernel's websocket ({reason}) and could not reconnect "
                    f"within {self.reconnect_s:g} s: {last}")  # fmt: skip
                return 1
            await asyncio.sleep(1.0)

    async def run(self, wait_s: float = 0.0) -> int:
        """Relay until the kernel ends or the bridge is stopped. `wait_s` > 0: the pool kernel
        may still be queued or starting; client messages wait here (ZMQ is bound) until it runs
        or `wait_s` passes."""
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.bind()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.interrupt)
        if wait_s > 0:
            waiting: asyncio.Future[None] = asyncio.ensure_future(
                asyncio.to_thread(wait_until_running, self.api, self.kernel_id, wait_s)
            )
            either: list[asyncio.Future[Any]] = [waiting, self.done]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():  # stopped while queued: the provisioner deletes the kernel
                self.ctx.destroy(linger=0)
                return 0
            error = waiting.exception()
            if isinstance(error, GatewayError):
                say(credentials.explain(error, self.api.url))
                return 1
            if error is not None:
                say(str(error))
                return 1
        tasks = [asyncio.ensure_future(self.from_client(n)) for n in ("shell", "control", "stdin")]
        tasks += [asyncio.ensure_future(self.watch_subscriptions()),
                  asyncio.ensure_future(self.watch_unconnected())]  # fmt: skip
        try:
            return await self.done
        finally:
            for task in [*tasks, *([self.opening] if self.opening else [])]:
                task.cancel()
            if self.ws is not None:
                await self.ws.close(1000, "the local kernel bridge ended")
            self.ctx.destroy(linger=500)

    def want(self) -> None:
        """A client needs the kernel's websocket: open it, once (see `watch_unconnected`)."""
        if self.opening is None:
            self.opening = asyncio.ensure_future(self.open_and_relay())

    async def open_and_relay(self) -> None:
        try:
            await self.connect()
        except InvalidStatus as error:
            body = error.response.body or b""
            try:
                message = str(json.loads(body).get("message", ""))
            except (ValueError, AttributeError):
                message = body.decode(errors="replace")[:200]
            say(f"the gateway refused the kernel's websocket ({error.response.status_code}): "
                f"{message}")  # fmt: skip
            self.finish(1)
            return
        except (OSError, TimeoutError) as error:
            say(f"cannot reach the gateway at {self.api.url}: {error}")
            self.finish(1)
            return
        self.finish(await self.from_gateway())

    async def watch_subscriptions(self) -> None:
        """IOPub subscriptions as they come: the first one opens the websocket."""
        sock = self.sockets["iopub"]
        while True:
            self.count_subscription(cast(bytes, await sock.recv()))
            if self.subscriptions:
                self.want()

    async def watch_unconnected(self) -> None:
        """Until a client needs the websocket, the bridge holds none: in Lab, no client of the
        bridge does (the browser's websocket goes to the gateway past it, see `pool_websocket`),
        and a second websocket would make the host, the gateway and this process relay every
        IOPub message twice. Meanwhile the kernel's end is learnt by asking the gateway."""
        while self.opening is None:
            await asyncio.sleep(self.poll_s)
            if self.opening is not None:
                return
            try:
                model = await asyncio.to_thread(self.api.kernel, self.kernel_id)
            except GatewayError:
                continue  # unreachable for now: the next look, or the websocket, will tell
            why = self.ended(model, "seen while no client used the bridge")
            if why:
                say(why)
                self.finish(1)
                return

    def ended(self, model: dict[str, Any] | None, reason: str) -> str:
        """Why the kernel of this model (None: gone) will never run again, else ""."""
        if model is None:
            return f"the pool kernel {self.kernel_id} is gone ({reason})"
        pool = model.get("gpupool") or {}
        if (pool.get("state") or model.get("execution_state")) == "dead":
            return f"the pool kernel {self.kernel_id} ended: {pool.get('reason') or reason}"
        return ""

    def finish(self, code: int) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(code)

    def stop(self) -> None:
        self.finish(0)

    def interrupt(self) -> None:
        """SIGINT (a client in `signal` interrupt mode that signals argv's process itself)."""
        future = asyncio.ensure_future(asyncio.to_thread(self.api.interrupt, self.kernel_id))
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)


def wait_until_running(api: GatewayApi, kernel_id: str, timeout: float, log: Any = say) -> None:
    """Poll the kernel's model while it is queued or starting, saying its queue position."""
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        model = api.kernel(kernel_id)
        if model is None:
            raise GatewayError(404, f"the pool kernel {kernel_id} vanished while starting")
        pool = model.get("gpupool") or {}
        state = pool.get("state") or "running"
        if state == "dead":
            raise GatewayError(0, f"the pool kernel ended while starting: {pool.get('reason')}")
        if state not in ("queued", "starting"):
            return
        shape = f"{pool.get('gpu_type')} ×{pool.get('gpu_count')}"  # noqa: RUF001
        now = (f"queued for {shape}, position {pool.get('queue_position')}" if state == "queued"
               else f"starting on {shape}")  # fmt: skip
        if now != said:
            log(now)
            said = now
        if time.monotonic() > deadline:
            raise TimeoutError(f"still {now} after {timeout:g} s; gave up")
        time.sleep(QUEUE_POLL_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jupyter_ext.kernel_bridge")
    parser.add_argument("-f", dest="connection_file", required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--kernel-id", help="a pool kernel started already")
    target.add_argument("--kernel-name", help="start a pool kernel of this kernelspec")
    parser.add_argument(
        "--wait-seconds",
        type=float,
        default=0.0,
        help="how long the kernel may stay queued or starting (with --kernel-name: "
        "$GPUPOOL_QUEUE_TIMEOUT, else 900)",
    )
    args = parser.parse_args(argv)
    with open(args.connection_file) as f:
        info = json.load(f)
    try:
        url, token = credentials.resolve()
    except credentials.CredentialsError as error:
        say(str(error))
        sys.exit(1)
    api = GatewayApi(url, token)
    kernel_id, owned, wait_s = args.kernel_id, False, args.wait_seconds
    if args.kernel_name:
        try:
            kernel_id = str(api.start_kernel(args.kernel_name)["id"])
        except GatewayError as error:
            say(credentials.explain(error, url))
            sys.exit(1)
        owned = True
        say(f"started pool kernel {kernel_id} ({args.kernel_name})")
        # Its ports are bound at once; the client's messages wait in the bridge while queued.
        wait_s = wait_s or float(os.environ.get("GPUPOOL_QUEUE_TIMEOUT", 900))
    code = 1
    try:
        use_uvloop()
        code = asyncio.run(Bridge(info, api, kernel_id).run(wait_s))
    finally:
        if owned:
            try:
                api.shutdown(kernel_id)
            except GatewayError as error:
                say(f"could not shut the pool kernel down: {error}")
    sys.exit(code)


if __name__ == "__main__":
    main()
