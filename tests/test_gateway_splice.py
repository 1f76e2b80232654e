"""The gateway's relay moves whole websocket frames between client and host as they came
(kernel_gateway/splice.py): large messages cross it intact both ways in both framings, and the
websocket's own checks still hold before a payload is read (size limit, reserved bits,
fragments, which take tornado's path)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Gateway
from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1
from kernel_ws import V1, run_code, ws_url
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

SIZE = 3 << 20  # bytes each way: well over a socket buffer, one frame


@pytest.fixture(scope="module")
def kernel(stack: Gateway) -> Iterator[str]:
    model = stack.create(name="python3")
    yield str(model["id"])
    assert stack.call("DELETE", f"/api/kernels/{model['id']}").status == 204


def raw_socket(stack: Gateway, kernel_id: str) -> ClientConnection:
    """A v1 websocket to the kernel at the gateway, whose raw TCP socket a test may write to."""
    return connect(
        ws_url(stack.url, kernel_id) + f"?session_id={uuid.uuid4().hex}",
        additional_headers={"Authorization": f"token {stack.token}"},
        subprotocols=[Subprotocol(V1)],
        max_size=64 << 20,
        open_timeout=30,
    )


def execute_parts(code: str) -> list[bytes]:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "test",
              "session": uuid.uuid4().hex, "date": "2026-01-01T00:00:00Z",
              "version": "5.3"}  # fmt: skip
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {},
               "allow_stdin": False}  # fmt: skip
    return [json.dumps(x).encode() for x in (header, {}, {}, content)]


def replies(
    ws: ClientConnection, msg_id: str, timeout: float = 30, until_idle: bool = True
) -> Iterator[dict[str, Any]]:
    """The messages whose parent is `msg_id`, until the kernel is idle again (or, with
    until_idle False, for as long as the caller reads)."""
    from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1

    while True:
        raw = ws.recv(timeout)
        assert isinstance(raw, bytes)
        _, parts = deserialize_msg_from_ws_v1(raw)
        parent = json.loads(parts[1])
        if parent.get("msg_id") != msg_id:
            continue
        msg = {"msg_type": json.loads(parts[0])["msg_type"], "content": json.loads(parts[3])}
        yield msg
        if (
            until_idle
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            return


def subscribed(ws: ClientConnection) -> None:
    """Return once this websocket gets the kernel's output: a fresh one's IOPub subscription at
    the host can lag its open on a busy machine (ZMQ's slow joiner), and output sent before it
    is not this websocket's to see."""
    parts = execute_parts("pass")
    ws.send(serialize_msg_to_ws_v1(parts, "shell"))
    for _ in replies(ws, json.loads(parts[0])["msg_id"]):
        pass


def stream_text(ws: ClientConnection, msg_id: str, size: int) -> list[str]:
    """The stdout of `msg_id` until `size` characters came: on a loaded machine ipykernel's
    flush can time out and send the last output after the idle status."""
    text: list[str] = []
    got = 0
    for msg in replies(ws, msg_id, until_idle=False):
        if msg["msg_type"] == "stream":
            text.append(msg["content"]["text"])
            got += len(text[-1])
            if got >= size:
                return text
    return text


@pytest.mark.parametrize("protocol", [V1, None], ids=["v1", "legacy"])
def test_large_messages_cross_intact_both_ways(
    stack: Gateway, kernel: str, protocol: str | None
) -> None:
    """A 3 MiB cell goes in (client to host) and 3 MiB of stdout comes out (host to client),
    each as one frame: every byte arrives as it was sent."""
    blob = os.urandom(SIZE // 2).hex()  # SIZE characters of text
    code = (f"import hashlib\nblob = {blob!r}\n"
            "print(hashlib.sha256(blob.encode()).hexdigest())\n"
            "print(blob[::-1], end='')")  # fmt: skip
    out = asyncio.run(run_code(stack.url, stack.token, kernel, code, protocol))
    digest, _, back = out.partition("\n")
    assert digest == hashlib.sha256(blob.encode()).hexdigest()
    assert back == blob[::-1]


def test_fragmented_message_takes_tornados_path(stack: Gateway, kernel: str) -> None:
    """A message sent in fragments is put together by the gateway (not spliced) and runs."""
    parts = execute_parts("print(6 * 7)")
    message = serialize_msg_to_ws_v1(parts, "shell")
    msg_id = json.loads(parts[0])["msg_id"]
    with raw_socket(stack, kernel) as ws:
        ws.send(iter([message[:10], message[10:100], message[100:]]))
        out = [m["content"]["text"] for m in replies(ws, msg_id) if m["msg_type"] == "stream"]
    assert "".join(out) == "42\n"


def test_frame_over_the_limit_is_refused_before_its_payload(stack: Gateway, kernel: str) -> None:
    """A frame header that announces 1 GiB (over the gateway's 64 MiB) is answered with 1009 at
    once: the gateway reads no payload to find out, and goes on serving."""
    with raw_socket(stack, kernel) as ws:
        ws.socket.sendall(bytes([0x82, 0x80 | 127]) + (1 << 30).to_bytes(8, "big") + os.urandom(4))
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(100):  # what the kernel broadcast before the refusal comes first
                ws.recv(30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert asyncio.run(run_code(stack.url, stack.token, kernel, "print(1)", V1)) == "1\n"


@pytest.mark.parametrize(
    "frame",
    [
        bytes([0x82 | 0x40, 0x80 | 5]) + bytes(9),  # RSV1: compression, never agreed
        bytes([0x89, 0x80 | 126]) + (200).to_bytes(2, "big") + bytes(204),  # a 200-byte ping
        bytes([0x08 & 0x7F, 0x80 | 2]) + bytes(6),  # a close frame that is not final
        bytes([0x80, 0x80 | 3]) + bytes(7),  # a continuation with nothing to continue
    ],
    ids=["reserved-bits", "long-ping", "fragmented-close", "stray-continuation"],
)
def test_bad_frames_end_the_connection_only(stack: Gateway, kernel: str, frame: bytes) -> None:
    with raw_socket(stack, kernel) as ws:
        ws.socket.sendall(frame)
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(30)  # whatever the kernel said first, then the end
    assert asyncio.run(run_code(stack.url, stack.token, kernel, "print(2)", V1)) == "2\n"


def test_messages_keep_their_order_across_both_paths(stack: Gateway, kernel: str) -> None:
    """Spliced frames and fragmented (tornado's) ones, interleaved, run in the order sent."""
    with raw_socket(stack, kernel) as ws:
        ids = []
        for index in range(6):
            parts = execute_parts(f"print({index})")
            ids.append(json.loads(parts[0])["msg_id"])
            message = serialize_msg_to_ws_v1(parts, "shell")
            ws.send(iter([message[:50], message[50:]]) if index % 2 else message)
        seen = []
        for msg_id in ids:  # (a print's text may come as two stream messages: "0", "\n")
            texts = [m["content"]["text"] for m in replies(ws, msg_id) if m["msg_type"] == "stream"]
            seen.append("".join(texts))
    assert seen == [f"{index}\n" for index in range(6)]


def rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def test_a_client_that_does_not_read_holds_back_the_gateway_not_its_memory(
    stack: Gateway, kernel: str
) -> None:
    """96 MiB of output for a websocket whose client reads nothing yet: the gateway keeps a few
    MiB of it (the rest waits at the host and in TCP), and the client still gets every byte, in
    order, once it reads. A second websocket, reading as it comes, says when the cell is done."""
    mib = 96
    # Flushed each MiB: one message each (unflushed, ipykernel sends it all as one message,
    # over the gateway's 64 MiB message limit).
    code = (f"import sys\nfor i in range({mib}):\n"
            "    sys.stdout.write(chr(65 + i % 26) * (1 << 20))\n"
            "    sys.stdout.flush()\n")  # fmt: skip
    parts = execute_parts(code)
    msg_id = json.loads(parts[0])["msg_id"]
    with raw_socket(stack, kernel) as slow, raw_socket(stack, kernel) as watcher:
        subscribed(slow)
        subscribed(watcher)
        before = rss(stack.proc.pid)
        slow.send(serialize_msg_to_ws_v1(parts, "shell"))
        seen = sum(len(part) for part in stream_text(watcher, msg_id, mib << 20))
        assert seen == mib << 20
        grown = rss(stack.proc.pid) - before
        assert grown < 48 << 20, f"the gateway grew by {grown >> 20} MiB for a reader that waits"
        text = stream_text(slow, msg_id, mib << 20)
    out = "".join(text)
    assert len(out) == mib << 20
    assert out[:: 1 << 20] == "".join(chr(65 + i % 26) for i in range(mib))
