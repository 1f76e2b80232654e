"""No frame a tenant sends can stop the host: the legacy binary framing is checked before it is
parsed, nothing is read after a close, and a message over the host's size limit is closed
naming the host's limit, also through the gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import start_gateway, start_host
from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1
from kernel_ws import V1, KernelSocket, closed_by, run_code, v1_head


def legacy_head(offsets: list[int]) -> bytes:
    return b"".join(n.to_bytes(4, "big") for n in (len(offsets), *offsets))


# Binary messages of the legacy framing that are not Jupyter messages: the part count that
# made jupyter_server's parser allocate 2**31 offsets, a count of 7 in a message of 16 bytes,
# offsets past the end or going back, no part at all, and 100 random bytes.
NOT_LEGACY = [
    b"\x7f\xff\xff\xff" + b"\0" * 16,
    (7).to_bytes(4, "big") + bytes(12),
    legacy_head([8, 10**6]),
    legacy_head([12, 8]) + b"{}{}",
    b"",
    random.Random(10).randbytes(100),
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def answers_at_once(agent: Any) -> None:
    started = time.monotonic()
    assert agent.call("GET", "/api/host").status == 200
    assert time.monotonic() - started < 1.0, "the host took over 1 s to answer"


@pytest.fixture(scope="module")
def kernel_id(host) -> str:
    return str(host.create(name="python3")["id"])


@pytest.mark.parametrize("payload", NOT_LEGACY)
def test_a_bad_legacy_binary_frame_closes_only_that_websocket(host, kernel_id, payload):
    before = rss_mb(host.proc.pid)

    async def send() -> tuple[Any, Any]:
        return await closed_by(await KernelSocket.open(host.url, host.token, kernel_id), payload)

    code, reason = asyncio.run(send())
    assert code == 1007, (code, reason)
    assert "legacy framing" in reason and "nothing was sent" in reason
    answers_at_once(host)
    assert rss_mb(host.proc.pid) - before < 100
    assert asyncio.run(run_code(host.url, host.token, kernel_id, "print(6 * 7)")) == "42\n"


def test_legacy_binary_messages_that_are_whole_still_work(host, kernel_id):
    """A message of the legacy binary framing (a comm message with a buffer, as ipywidgets
    sends) passes the check and reaches the kernel."""

    async def session() -> dict[str, Any]:
        sock = await KernelSocket.open(host.url, host.token, kernel_id)
        msg = sock._message("kernel_info_request", {})
        msg["channel"] = "shell"
        body = json.dumps(msg).encode()
        head = 4 * 3
        frame = legacy_head([head, head + len(body)]) + body + b"buffer"
        await sock.conn.write_message(frame, binary=True)
        while True:
            reply = await sock.recv(30)
            if reply["msg_type"] == "kernel_info_reply":
                sock.close()
                return reply

    assert asyncio.run(session())["content"]["status"] == "ok"


@pytest.mark.parametrize("protocol", [None, V1])
def test_nothing_is_read_after_a_close(host, kernel_id, tmp_path, protocol):
    """A bad message and, right behind it on the wire, a good one that would write a file: the
    first closes the websocket, and the second never reaches the kernel."""
    marker = tmp_path / f"ran-{protocol}"
    code = f"open({str(marker)!r}, 'w').close()"

    async def send() -> tuple[Any, Any]:
        sock = await KernelSocket.open(host.url, host.token, kernel_id, protocol)
        msg = sock._message("execute_request", {"code": code, "silent": False})
        if protocol == V1:
            bad = v1_head([56, 61, 10**6, 0, 0, 0])
            parts = [json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata")]
            good = serialize_msg_to_ws_v1([*parts, json.dumps(msg["content"]).encode()], "shell")
        else:
            bad = b"\x7f\xff\xff\xff" + b"\0" * 16
            good = json.dumps({**msg, "channel": "shell"}).encode()
        sock.conn.write_message(bad, binary=True)
        sock.conn.write_message(good, binary=protocol == V1)  # no wait between the two
        while await asyncio.wait_for(sock.conn.read_message(), 30) is not None:
            pass
        return sock.conn.close_code, sock.conn.close_reason

    close_code, _ = asyncio.run(send())
    assert close_code == 1007
    # The kernel runs cells in order: one run after the close shows whether the other ran.
    check = f"import os; print(os.path.exists({str(marker)!r}))"
    assert asyncio.run(run_code(host.url, host.token, kernel_id, check)) == "False\n"


def big_message(sock: KernelSocket, mib: float) -> bytes:
    msg = sock._message("execute_request", {"code": "x" * int(mib * 2**20), "silent": False})
    parts = [json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata")]
    return serialize_msg_to_ws_v1([*parts, json.dumps(msg["content"]).encode()], "shell")


def test_a_message_over_the_hosts_limit_names_the_hosts_limit(tmp_path: Path):
    """The host takes 1 MiB here and the gateway 64 MiB: a 2 MiB message is refused by the
    host, and the close says so, straight from the host and through the gateway."""
    gateway = start_gateway(tmp_path, state=tmp_path / "gw")
    agent = None
    try:
        tenant_token = gateway.tenant("a")
        folder = tmp_path / "host"
        folder.mkdir()
        agent = start_host(
            folder, "--fake-gpus", "H100:1", "--no-isolate", "--warm-per-shape", "0",
            "--max-message-mb", "1", "--gateway", gateway.url,
            f"--join-token={gateway.join_token}", "--heartbeat-seconds", "0.5",
        )  # fmt: skip
        on_host = agent.create(name="python3")["id"]
        gateway.wait_for(
            lambda: gateway.call("GET", "/api/hosts", token=gateway.admin_token).body,
            15, "the host to register",
        )  # fmt: skip
        reply = gateway.call("POST", "/api/kernels", {"name": "python3"}, token=tenant_token)
        assert reply.status == 201, reply.body
        on_gateway = reply.body["id"]

        async def send(url: str, token: str, kernel: str) -> tuple[Any, Any]:
            sock = await KernelSocket.open(url, token, kernel, V1)
            return await closed_by(sock, big_message(sock, 2))

        for url, token, kernel in (
            (agent.url, agent.token, on_host),
            (gateway.url, tenant_token, on_gateway),
        ):
            code, reason = asyncio.run(send(url, token, kernel))
            assert code == 1009, (url, code, reason)
            assert "over 1 MiB, the host's limit" in reason, reason
        # Under the limit is fine.
        sock_out = asyncio.run(run_code(gateway.url, tenant_token, on_gateway, "print(1)", V1))
        assert sock_out == "1\n"
    finally:
        if agent is not None:
            agent.stop()
        gateway.stop()


def test_a_client_still_sending_a_refused_message_reads_the_close(host, kernel_id):
    """A client (the gateway on a loaded machine) still sending a message the host refused
    must be able to finish its writes and then read the host's 1009 close: the host reads
    and drops the rest instead of resetting the connection under it, which lost the close
    (the gateway then told its client only that the kernel's connection ended)."""
    port = int(host.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        key = base64.b64encode(os.urandom(16)).decode()
        conn.sendall(
            f"GET /api/kernels/{kernel_id}/channels?session_id=drain HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {V1}\r\nAuthorization: token {host.token}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        length = 64 << 20  # over the host's limit; the mask key is zero, so bytes go as they are
        conn.sendall(bytes([0x82, 0x80 | 127]) + length.to_bytes(8, "big") + bytes(4))
        conn.sendall(bytes(1 << 16))
        time.sleep(0.5)  # the host has refused the message by now; the client is still sending
        conn.sendall(bytes(4 << 20))  # a reset host makes this (or the read below) fail
        received = head.split(b"\r\n\r\n", 1)[1]

        def take(count: int) -> bytes:
            nonlocal received
            while len(received) < count:
                chunk = conn.recv(4096)
                assert chunk, "the host closed the connection without a close frame"
                received += chunk
            taken, received = received[:count], received[count:]
            return taken

        # The kernel's own messages may come first (an IOPub status sent as the client
        # connected, seen in CI); the close frame follows them.
        for _ in range(100):
            first, second = take(2)
            size = second & 0x7F
            if size == 126:
                size = int.from_bytes(take(2), "big")
            elif size == 127:
                size = int.from_bytes(take(8), "big")
            payload = take(size)
            if first == 0x88:
                break
            assert first == 0x82, (first, payload[:20])  # a kernel message (v1 framing)
        else:
            raise AssertionError("no close frame in 100 frames")
        code = int.from_bytes(payload[:2], "big")
        reason = payload[2:].decode()
        assert (code, "the host's limit" in reason) == (1009, True), (code, reason)
