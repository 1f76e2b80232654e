"""A GPU kernel's websocket, spoken in the binary `v1.kernel.websocket.jupyter.org` protocol so
that message buffers travel as raw bytes. A background thread owns the event loop (a magic runs
inside the notebook kernel's own loop and may not block it with another); the magic's thread
sends, and reads the messages that answer its requests from a queue per request."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # tornado's client is imported on first use: pool kernels load this at start
    from tornado.websocket import WebSocketClientConnection

V1 = "v1.kernel.websocket.jupyter.org"
MAX_MESSAGE_BYTES = 64 << 20
CLOSED = {"msg_type": "_closed"}  # what a waiting queue receives when the websocket ends


def encode(channel: str, parts: Sequence[Any]) -> bytes:
    """One v1 frame: the part count, the offsets, the channel name, then the parts."""
    name = channel.encode()
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(name))
    for part in parts:
        offsets.append(offsets[-1] + memoryview(part).nbytes)
    head = [len(offsets).to_bytes(8, "little"), *(o.to_bytes(8, "little") for o in offsets)]
    return b"".join([*head, name, *parts])


def decode(frame: bytes) -> dict[str, Any]:
    """A v1 frame as a message dict; buffers are views into the frame (no copies)."""
    view = memoryview(frame)
    count = int.from_bytes(view[:8], "little")
    offsets = [int.from_bytes(view[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    parts = [view[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
    header, parent, metadata, content = (json.loads(bytes(p)) for p in parts[1:5])
    return {
        "channel": bytes(parts[0]).decode(),
        "header": header,
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
        "buffers": parts[5:],
        "msg_type": header.get("msg_type"),
    }


class _LoopThread:
    """One daemon thread running an asyncio loop for every channel of this process."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="gpupool-websocket", daemon=True
                )
                thread.start()
                cls._loop = loop
            return cls._loop


class KernelChannel:
    """The websocket of one kernel at the gateway."""

    def __init__(self, gateway_url: str, token: str, kernel_id: str) -> None:
        self.url = (
            gateway_url.rstrip("/").replace("http", "ws", 1)
            + f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
        )
        self.token = token
        self.session = uuid.uuid4().hex
        self.conn: WebSocketClientConnection | None = None
        self.closed_reason = ""
        self._waiters: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._loop = _LoopThread.loop()

    @property
    def open(self) -> bool:
        return self.conn is not None and not self.closed_reason

    def connect(self, timeout: float = 30) -> None:
        future = asyncio.run_coroutine_threadsafe(self._connect(), self._loop)
        future.result(timeout)

    async def _connect(self) -> None:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        request = HTTPRequest(self.url, headers={"Authorization": f"token {self.token}"})
        conn = await websocket_connect(
            request, subprotocols=[V1], max_message_size=MAX_MESSAGE_BYTES
        )
        if conn.selected_subprotocol != V1:
            conn.close()
            raise ConnectionError(
                f"the gateway did not accept the {V1} websocket protocol, which %%gpu needs "
                "to send variables as raw bytes; upgrade the gateway"
            )
        conn.stream.set_nodelay(True)
        self.conn = conn
        asyncio.get_running_loop().create_task(self._read(conn))

    async def _read(self, conn: WebSocketClientConnection) -> None:
        while True:
            frame = await conn.read_message()
            if frame is None:
                reason = conn.close_reason or f"code {conn.close_code}"
                self.closed_reason = f"the GPU kernel's websocket closed ({reason})"
                for waiting in list(self._waiters.values()):
                    waiting.put(CLOSED)
                return
            if not isinstance(frame, bytes):
                continue  # v1 frames are binary
            msg = decode(frame)
            listener = self._waiters.get(msg["parent_header"].get("msg_id", ""))
            if listener is not None:
                listener.put(msg)

    def send(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        buffers: Sequence[Any] = (),
        listen: bool = True,
    ) -> tuple[str, queue.Queue[dict[str, Any]] | None]:
        """Send a message; with `listen`, the messages whose parent it is arrive on the queue
        returned (call `forget` with the id when done)."""
        if not self.open:
            raise ConnectionError(self.closed_reason or "the GPU kernel's websocket is not open")
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": self.session,
            "username": "gpupool",
            "date": datetime.now(timezone.utc).isoformat(),
            "version": "5.3",
        }
        waiting: queue.Queue[dict[str, Any]] | None = None
        if listen:
            waiting = self._waiters[msg_id] = queue.Queue()
        parts = [json.dumps(x).encode() for x in (header, {}, {}, content)]
        frame = encode(channel, [*parts, *buffers])
        future = asyncio.run_coroutine_threadsafe(self._write(frame), self._loop)
        try:
            future.result(60)
        except BaseException:
            self.forget(msg_id)
            raise
        return msg_id, waiting

    async def _write(self, frame: bytes) -> None:
        assert self.conn is not None
        await self.conn.write_message(frame, binary=True)

    def forget(self, msg_id: str) -> None:
        self._waiters.pop(msg_id, None)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        self.closed_reason = self.closed_reason or "closed by this kernel"
        if conn is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(conn.close)
