"""A small client for a kernel's websocket, in both framings jupyter_server speaks: the legacy
JSON frames and the binary `v1.kernel.websocket.jupyter.org` protocol. Used by tests and bench."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timezone
from typing import Any

from jupyter_server.services.kernels.connection.base import (
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from gpupool.wire import V1_PROTOCOL

V1 = V1_PROTOCOL


def ws_url(http_url: str, kernel_id: str) -> str:
    return http_url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"


class KernelSocket:
    def __init__(self, conn: WebSocketClientConnection, protocol: str | None) -> None:
        self.conn = conn
        self.protocol = protocol
        self.session = uuid.uuid4().hex

    @classmethod
    async def open(
        cls, http_url: str, token: str, kernel_id: str, protocol: str | None = None
    ) -> KernelSocket:
        request = HTTPRequest(
            ws_url(http_url, kernel_id) + f"?session_id={uuid.uuid4().hex}",
            headers={"Authorization": f"token {token}"},
        )
        conn = await websocket_connect(
            request, subprotocols=[protocol] if protocol else None, max_message_size=256 << 20
        )
        return cls(conn, conn.selected_subprotocol)

    def close(self) -> None:
        self.conn.close()

    def _message(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        header = {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": self.session,
            "username": "test",
            "date": datetime.now(timezone.utc).isoformat(),
            "version": "5.3",
        }
        return {"header": header, "parent_header": {}, "metadata": {}, "content": content}

    async def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg = self._message(msg_type, content)
        if self.protocol == V1:
            parts = [
                json.dumps(msg[k]).encode()
                for k in ("header", "parent_header", "metadata", "content")
            ]
            await self.conn.write_message(serialize_msg_to_ws_v1(parts, channel), binary=True)
        else:
            await self.conn.write_message(json.dumps({**msg, "channel": channel, "buffers": []}))
        return str(msg["header"]["msg_id"])

    async def recv(self, timeout: float = 30) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        if raw is None:
            raise ConnectionError("the websocket closed")
        if isinstance(raw, bytes):
            channel, parts = deserialize_msg_from_ws_v1(raw)
            keys = ("header", "parent_header", "metadata", "content")
            msg = {k: json.loads(p) for k, p in zip(keys, parts[:4], strict=True)}
            msg["channel"] = channel
            msg["msg_type"] = msg["header"]["msg_type"]
            return msg
        return dict(json.loads(raw))

    async def kernel_info(self, timeout: float = 30) -> dict[str, Any]:
        msg_id = await self.send("shell", "kernel_info_request", {})
        while True:
            msg = await self.recv(timeout)
            if (
                msg["msg_type"] == "kernel_info_reply"
                and msg["parent_header"].get("msg_id") == msg_id
            ):
                return msg

    async def execute(self, code: str, timeout: float = 60) -> tuple[str, dict[str, Any]]:
        """Run `code`; return its stdout and its execute_reply content, after the kernel is idle."""
        msg_id = await self.send(
            "shell", "execute_request", {"code": code, "silent": False, "store_history": False,
                                         "user_expressions": {}, "allow_stdin": False}
        )  # fmt: skip
        stdout, reply, idle = [], None, False
        while reply is None or not idle:
            msg = await self.recv(timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream" and msg["content"]["name"] == "stdout":
                stdout.append(msg["content"]["text"])
            elif kind == "error":
                stdout.append("\n".join(msg["content"]["traceback"]))
            elif kind == "execute_reply":
                reply = msg["content"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        return "".join(stdout), reply


async def run_code(
    http_url: str, token: str, kernel_id: str, code: str, protocol: str | None = None
) -> str:
    """Open a websocket, run `code`, return its stdout (raising if the cell failed)."""
    sock = await KernelSocket.open(http_url, token, kernel_id, protocol)
    try:
        out, reply = await sock.execute(code)
    finally:
        sock.close()
    if reply["status"] != "ok":
        raise AssertionError(f"cell failed: {out}")
    return out


async def closed_by(sock: KernelSocket, payload: bytes, timeout: float = 30) -> tuple[Any, Any]:
    """Send `payload` as one binary message; the close code and reason that follow."""
    try:
        await sock.conn.write_message(payload, binary=True)
    except WebSocketClosedError:
        pass  # closed while a large payload was still being written: the close says why
    while await asyncio.wait_for(sock.conn.read_message(), timeout) is not None:
        pass  # what the kernel said before the close
    return sock.conn.close_code, sock.conn.close_reason


def v1_head(offsets: list[int]) -> bytes:
    return b"".join(n.to_bytes(8, "little") for n in (len(offsets), *offsets))


# Binary messages that are not v1 kernel messages: a part count far past the message (2**64-1,
# and 7 in a message of 16 bytes), offsets past its end, nothing at all, a channel name that is
# not UTF-8, and 5000 empty parts (more than a message may have).
NOT_V1_MESSAGES = [
    b"\xff" * 16,
    (7).to_bytes(8, "little") + bytes(8),
    v1_head([56, 61, 10**6, 0, 0, 0]),
    b"",
    v1_head([56, 57, 57, 57, 57, 57]) + b"\xff",
    v1_head([8 * 5001] * 5000),
]
