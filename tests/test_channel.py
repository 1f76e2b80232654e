"""`%%gpu`'s kernel websocket (`jupyter_ext.channel`) against a real websocket server on loopback:
the handshake and its refusals, delivery by parent, what is dropped, fragments, limits, pings and
both ends closing. The server is `websockets`' threaded one, so each test says what it sends."""

from __future__ import annotations

import json
import queue
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import self_signed_cert
from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1
from websockets.datastructures import Headers
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.sync.server import ServerConnection, serve

from gpupool.wire import V1_PROTOCOL
from jupyter_ext import channel as channel_module
from jupyter_ext.agent import StartedNotice
from jupyter_ext.channel import CLOSED, KernelChannel, decode

TOKEN = "t" * 43


def frame(parent_id: str, msg_type: str, content: dict[str, Any], *buffers: bytes) -> bytes:
    parts = [
        json.dumps(x).encode()
        for x in ({"msg_id": "m", "msg_type": msg_type}, {"msg_id": parent_id}, {}, content)
    ]
    return bytes(serialize_msg_to_ws_v1([*parts, *buffers], "iopub"))


class Server:
    """A websocket server on 127.0.0.1 whose connections run `handler`; what it got is kept."""

    def __init__(self, handler: Callable[[ServerConnection], None], **options: Any) -> None:
        self.received: queue.Queue[bytes | str] = queue.Queue()
        self.headers: list[Headers] = []

        def run(ws: ServerConnection) -> None:
            assert ws.request is not None
            self.headers.append(ws.request.headers)
            handler(ws)

        options.setdefault("subprotocols", [V1_PROTOCOL])
        options.setdefault("max_size", None)
        self.server = serve(run, "127.0.0.1", 0, compression=None, **options)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.stop()


def connected(
    servers: list[Server], handler: Callable[[ServerConnection], None]
) -> tuple[Server, KernelChannel]:
    """A server running `handler` (stopped after the test) and a channel open to it."""
    server = Server(handler)
    servers.append(server)
    channel = KernelChannel(server.url, TOKEN, "k1")
    channel.connect(timeout=10)
    return server, channel


def echo_as_iopub(ws: ServerConnection) -> None:
    """Answers each message with its busy status, a stream with the same bytes, and idle."""
    for message in ws:
        assert isinstance(message, bytes)
        msg = decode(message)
        parent = msg["header"]["msg_id"]
        ws.send(frame(parent, "status", {"execution_state": "busy"}))
        ws.send(frame(parent, "stream", {"name": "stdout", "text": "x"}, *msg["buffers"]))
        ws.send(frame("somebody-else", "stream", {"name": "stdout", "text": "not yours"}))
        ws.send(b"\x00garbage that is not a v1 frame")
        ws.send("a text message")
        ws.send(frame(parent, "status", {"execution_state": "idle"}))


def take(waiting: queue.Queue[dict[str, Any]] | None, timeout: float = 10) -> dict[str, Any]:
    assert waiting is not None
    return waiting.get(timeout=timeout)


def test_messages_reach_the_request_they_answer(servers: list[Server]) -> None:
    server, channel = connected(servers, echo_as_iopub)
    assert channel.open
    for _ in range(500):  # the server's handler records them a moment after the handshake
        if server.headers:
            break
        time.sleep(0.01)
    assert server.headers[0]["Authorization"] == f"token {TOKEN}"
    big = bytes(range(256)) * 40_000  # 10 MB: several reads, one message
    msg_id, waiting = channel.send("shell", "comm_msg", {"data": {}}, [b"small", big])
    first = take(waiting)
    # busy is dropped; so are messages of other requests, broken frames and text messages.
    assert first["msg_type"] == "stream" and first["parent_header"]["msg_id"] == msg_id
    assert [bytes(b) for b in first["buffers"]] == [b"small", big]
    assert take(waiting)["content"] == {"execution_state": "idle"}
    channel.forget(msg_id)
    again, waiting = channel.send("shell", "comm_msg", {"data": {}}, listen=True)
    assert take(waiting)["parent_header"]["msg_id"] == again
    channel.close()
    assert not channel.open
    with pytest.raises(ConnectionError, match="closed by this kernel"):
        channel.send("shell", "comm_msg", {})


def test_fragments_pings_and_the_servers_close(servers: list[Server]) -> None:
    pinged = threading.Event()

    def handler(ws: ServerConnection) -> None:
        message = ws.recv()
        assert isinstance(message, bytes)
        parent = decode(message)["header"]["msg_id"]
        whole = frame(parent, "stream", {"text": "in three pieces"})
        ws.send([whole[:10], whole[10:30], whole[30:]])  # one message, fragmented
        if ws.ping().wait(10):  # the client answers pings by itself
            pinged.set()
        ws.close(1011, "the kernel's host is not connected to the gateway; try again soon")

    _, channel = connected(servers, handler)
    _, waiting = channel.send("shell", "comm_msg", {})
    assert take(waiting)["content"] == {"text": "in three pieces"}
    assert take(waiting) is CLOSED  # a waiting cell hears that the websocket ended
    assert pinged.is_set()
    assert not channel.open
    assert "host is not connected to the gateway" in channel.closed_reason
    with pytest.raises(ConnectionError, match="host is not connected"):
        channel.send("shell", "comm_msg", {})


def test_a_message_over_the_limit_closes_with_a_reason(
    servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_module, "MAX_MESSAGE_BYTES", 1 << 20)

    def handler(ws: ServerConnection) -> None:
        ws.recv()
        ws.send(b"\x00" * (2 << 20))
        time.sleep(1)

    _, channel = connected(servers, handler)
    _, waiting = channel.send("shell", "comm_msg", {})
    assert take(waiting) is CLOSED
    assert "over 1 MiB" in channel.closed_reason


def test_refusals_are_said_in_the_gateways_words(servers: list[Server]) -> None:
    def refuse(connection: ServerConnection, request: Any) -> Response:
        body = json.dumps({"reason": "Not Found", "message": "no kernel k1"}).encode()
        headers = Headers([("Content-Type", "application/json")])
        return Response(404, "Not Found", headers, body)

    refusing = Server(echo_as_iopub, process_request=refuse)
    servers.append(refusing)
    with pytest.raises(ConnectionError, match=r"refused .*\(404 Not Found\): no kernel k1"):
        KernelChannel(refusing.url, TOKEN, "k1").connect(timeout=10)

    no_v1 = Server(echo_as_iopub, select_subprotocol=lambda connection, offered: None)
    servers.append(no_v1)
    with pytest.raises(ConnectionError, match=f"did not accept the {V1_PROTOCOL}"):
        KernelChannel(no_v1.url, TOKEN, "k1").connect(timeout=10)

    with pytest.raises(OSError):  # nothing listens there any more
        port = int(refusing.url.rsplit(":", 1)[1])
        refusing.stop()
        servers.remove(refusing)
        KernelChannel(f"http://127.0.0.1:{port}", TOKEN, "k1").connect(timeout=5)


def test_started_notice_only_for_a_cell_that_runs_long() -> None:
    sent: queue.Queue[tuple[str, float]] = queue.Queue()
    notice = StartedNotice(lambda parent, run_id: sent.put((run_id, time.monotonic())), 0.2)
    notice.arm({"header": {"msg_id": "quick"}}, "quick")
    notice.disarm()  # done before 0.2 s: its answer says it started
    armed = time.monotonic()
    notice.arm({"header": {"msg_id": "long"}}, "long")  # while the watch waits for "quick"
    run_id, when = sent.get(timeout=5)
    assert run_id == "long" and when - armed >= 0.2
    notice.disarm()
    time.sleep(0.4)
    assert sent.empty()  # once per cell, and never for the quick one
    armed = time.monotonic()
    notice.arm({"header": {"msg_id": "later"}}, "later")  # the watch was asleep: woken
    run_id, when = sent.get(timeout=5)
    assert run_id == "later" and 0.2 <= when - armed < 3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_wss_with_the_systems_trust_and_both_ways_at_once(
    servers: list[Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https gateway: the certificate is checked against the trust store (SSL_CERT_FILE
    here), and the reader and the writer share the TLS socket with both directions busy."""
    cert, key = self_signed_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = Server(echo_as_iopub, ssl=context)
    servers.append(server)
    url = server.url.replace("http://", "https://")
    with pytest.raises(ssl.SSLCertVerificationError):
        KernelChannel(url, TOKEN, "k1").connect(timeout=10)  # not trusted yet
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    channel = KernelChannel(url, TOKEN, "k1")
    channel.connect(timeout=10)
    chunk = b"\x07" * (1 << 20)
    pending = []
    for _ in range(40):  # 40 MB out while the answers (as large) come back
        pending.append(channel.send("shell", "comm_msg", {}, [chunk]))
    for msg_id, waiting in pending:
        answer = take(waiting)
        assert answer["parent_header"]["msg_id"] == msg_id and bytes(answer["buffers"][0]) == chunk
        assert take(waiting)["content"] == {"execution_state": "idle"}
    channel.close()


def test_frames_the_library_reads_back_whatever_the_pieces() -> None:
    """Our masked frames, piece by piece and key turned to each offset, are what websockets'
    own server parser reads, for small frames (joined) and large ones (pieces of odd sizes)."""
    key = b"\x9a\x01\xfe\x42"
    cases = [
        [b""],
        [b"x" * 125],
        [b"ab", b"c" * 70_000],
        [b"hello", bytes(range(256)) * 1200, b"z", memoryview(bytes(range(7)) * 100_000)[3:]],
    ]
    for pieces in cases:
        server = ServerProtocol(state=State.OPEN, max_size=None)
        server.receive_data(b"".join(channel_module.masked_frame(pieces, key)))
        (got,) = server.events_received()
        assert got.opcode is Opcode.BINARY and got.fin
        assert got.data == b"".join(bytes(p) for p in pieces)


@pytest.mark.parametrize("reads_into", [True, False], ids=["plain", "tls-like"])
def test_frame_reader_takes_whole_binary_frames_and_hands_the_rest_on(reads_into: bool) -> None:
    """Whole binary frames come back as payloads, read into a buffer of their size (straight
    from the socket, or via `recv` as under TLS), whatever the packets; pings, fragments and
    text come back raw for the protocol; a frame over the limit hands everything after it on."""
    import os
    import socket

    from jupyter_ext.transport import Transport

    class Wire(Transport):
        pass

    Wire.reads_into = reads_into
    big = os.urandom(3 << 20)
    over = channel_module.MAX_MESSAGE_BYTES + 1
    stream = (bytes([0x82, 127]) + len(big).to_bytes(8, "big") + big
              + bytes([0x89, 3]) + b"abc"  # a ping
              + bytes([0x02, 2]) + b"xy" + bytes([0x89, 0]) + bytes([0x80, 1]) + b"z"  # fragments
              + bytes([0x81, 2]) + b"hi" + bytes([0x82, 5]) + b"hello"
              + bytes([0x82, 126]) + (300).to_bytes(2, "big") + b"q" * 300
              + bytes([0x82, 127]) + over.to_bytes(8, "big") + b"rest")  # fmt: skip
    here, there = socket.socketpair()
    writer = threading.Thread(target=lambda: (there.sendall(stream), there.close()))
    writer.start()
    # The first bytes came with the handshake's answer.
    frames = channel_module.FrameReader(Wire(here), stream[:5])
    assert here.recv(5, socket.MSG_WAITALL) == stream[:5]
    got: list[tuple[str, bytes]] = []
    while True:
        message, raw = frames.next()
        if message is None and not raw:
            break
        got.append(("message", bytes(message)) if message is not None else ("raw", raw))
    writer.join(10)
    here.close()
    assert got[0] == ("message", big)
    assert got[1:6] == [("raw", bytes([0x89, 3]) + b"abc"), ("raw", bytes([0x02, 2]) + b"xy"),
                        ("raw", bytes([0x89, 0])), ("raw", bytes([0x80, 1]) + b"z"),
                        ("raw", bytes([0x81, 2]) + b"hi")]  # fmt: skip
    assert got[6:8] == [("message", b"hello"), ("message", b"q" * 300)]
    assert (
        b"".join(raw for _, raw in got[8:])
        == bytes([0x82, 127]) + over.to_bytes(8, "big") + b"rest"
    )
    assert all(kind == "raw" for kind, _ in got[8:])


def test_quiet_spells_text_fragments_and_a_cut_off_send(
    servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that times out delivers nothing twice; a fragmented text message is dropped
    whole; a send interrupted after part of its frame went out closes the websocket, since
    what followed would be read as the rest of that frame."""
    monkeypatch.setattr(channel_module, "IO_TIMEOUT_S", 0.1)

    def handler(ws: ServerConnection) -> None:
        message = ws.recv()
        assert isinstance(message, bytes)
        parent = decode(message)["header"]["msg_id"]
        ws.send(frame(parent, "stream", {"text": "once"}))
        time.sleep(0.5)  # several read timeouts on the client
        ws.send(["text in ", "two pieces"])
        ws.send(frame(parent, "status", {"execution_state": "idle"}))
        for _ in ws:
            pass

    _, channel = connected(servers, handler)
    _, waiting = channel.send("shell", "comm_msg", {})
    assert take(waiting)["content"] == {"text": "once"}
    assert take(waiting)["content"] == {"execution_state": "idle"}
    assert waiting is not None and waiting.empty()

    wire = channel._wire
    assert wire is not None
    sent = []

    def interrupted(chunk: bytes) -> None:
        if sent:
            raise KeyboardInterrupt
        sent.append(chunk)
        type(wire).send(wire, chunk)

    monkeypatch.setattr(wire, "send", interrupted)
    with pytest.raises(KeyboardInterrupt):
        channel.send("shell", "comm_msg", {}, [b"x" * (1 << 20)])  # a frame of several chunks
    assert not channel.open and "cut off" in channel.closed_reason
