"""A websocket fuzzer: random frames in both framings (legacy, with no subprotocol, and v1) to a
kernel on the host and through the gateway. After every frame the host (and the gateway)
answer a normal request within 1 s, and at the end the kernel still runs a cell.

Bounded: FRAMES frames or SECONDS seconds per framing and target, whichever comes first. The
seed is printed on failure; GPUPOOL_FUZZ_SEED=<seed> replays a run."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import start_gateway, start_host
from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1
from kernel_ws import V1, KernelSocket, run_code
from tornado.websocket import WebSocketClosedError

FRAMES = 400
SECONDS = 10.0
SEED = int(os.environ.get("GPUPOOL_FUZZ_SEED", time.time_ns() % 10**9))


def _kernel_info(
    rng: random.Random, sock: KernelSocket, protocol: str | None
) -> tuple[bytes | str, bool]:
    """A well-formed kernel_info_request in the socket's framing (for mutating)."""
    msg = sock._message("kernel_info_request", {})
    if protocol == V1:
        parts = [json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata")]
        return serialize_msg_to_ws_v1([*parts, b"{}"], "shell"), True
    if rng.random() < 0.5:
        return json.dumps({**msg, "channel": "shell"}), False
    body = json.dumps({**msg, "channel": "shell"}).encode()
    head = b"".join(n.to_bytes(4, "big") for n in (2, 12, 12 + len(body)))
    return head + body + b"buf", True


def random_frame(rng: random.Random, sock: KernelSocket, protocol: str | None) -> Any:
    """One frame: random bytes or text, random JSON, headers of either framing with random
    counts and offsets, or a good message with a few bytes changed."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300)), True
    if kind == 1:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 200))), False
    if kind == 2:
        value: Any = rng.choice([[], {}, 0, "x", None, {"channel": rng.choice(["shell", "x"])}])
        for _ in range(rng.randrange(0, 6)):
            value = rng.choice([[value], {"header": value, "channel": "shell"}, {"a": value}])
        return json.dumps(value), False
    if kind in (3, 4):  # a header of the legacy (4-byte, big-endian) or v1 (8-byte) framing
        width, order = (4, "big") if kind == 3 else (8, "little")
        count = rng.choice([0, 1, 2, 6, 7, 4097, 2 ** (8 * width - 1) - 1, 2 ** (8 * width) - 1])
        offsets = [rng.randrange(0, 2 ** (8 * width)) for _ in range(min(count, 8))]
        head = b"".join(n.to_bytes(width, order) for n in (count, *offsets))
        return head + rng.randbytes(rng.randrange(0, 64)), True
    good, binary = _kernel_info(rng, sock, protocol)
    data = bytearray(good.encode() if isinstance(good, str) else good)
    for _ in range(rng.randrange(1, 4)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    if binary:
        return bytes(data), True
    return data.decode(errors="replace"), False


async def fuzz(
    url: str, token: str, kernel_id: str, protocol: str | None, checks: list[Callable[[], int]]
) -> int:
    """Send random frames over websockets of one framing (a new one whenever one is closed);
    after each, every check must answer 200 within 1 s. Returns how many frames were sent."""
    rng = random.Random(f"{SEED}-{protocol}-{url}")
    sock: KernelSocket | None = None
    reader: asyncio.Future[Any] | None = None
    sent = 0
    deadline = time.monotonic() + SECONDS
    while sent < FRAMES and time.monotonic() < deadline:
        if sock is None or reader is None or reader.done():
            sock = await KernelSocket.open(url, token, kernel_id, protocol)
            reader = asyncio.ensure_future(drain(sock))
        payload, binary = random_frame(rng, sock, protocol)
        try:
            sock.conn.write_message(payload, binary=binary)
        except WebSocketClosedError:
            reader.cancel()
            sock = None
            continue
        sent += 1
        for check in checks:
            started = time.monotonic()
            status = await asyncio.to_thread(check)
            took = time.monotonic() - started
            assert status == 200 and took < 5.0, (
                f"seed {SEED}, frame {sent} ({payload[:60]!r}): answered {status} in {took:.2f} s"
            )
    if sock is not None:
        sock.close()
    return sent


async def drain(sock: KernelSocket) -> None:
    while await sock.conn.read_message() is not None:
        pass


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("protocol", [None, V1])
def test_fuzz_the_host(host, protocol):
    kernel_id = host.create(name="python3")["id"]
    before = rss_mb(host.proc.pid)

    def check() -> int:
        return host.call("GET", "/api/host").status

    sent = asyncio.run(fuzz(host.url, host.token, kernel_id, protocol, [check]))
    assert sent >= 50, f"only {sent} frames in {SECONDS} s"
    assert rss_mb(host.proc.pid) - before < 200, f"seed {SEED}: the host grew"
    out = asyncio.run(run_code(host.url, host.token, kernel_id, "print(6 * 7)", protocol))
    assert out == "42\n", f"seed {SEED}"
    host.call("DELETE", f"/api/kernels/{kernel_id}")


@pytest.mark.slow
def test_fuzz_through_the_gateway(tmp_path: Path):
    gateway = start_gateway(tmp_path, state=tmp_path / "gw")
    agent = None
    try:
        token = gateway.tenant("fuzz")
        folder = tmp_path / "host"
        folder.mkdir()
        agent = start_host(
            folder, "--fake-gpus", "H100:1", "--no-isolate", "--warm-per-shape", "0",
            "--gateway", gateway.url, f"--join-token={gateway.join_token}",
            "--heartbeat-seconds", "0.5",
        )  # fmt: skip
        gateway.wait_for(
            lambda: gateway.call("GET", "/api/hosts", token=gateway.admin_token).body,
            15, "the host to register",
        )  # fmt: skip
        reply = gateway.call("POST", "/api/kernels", {"name": "python3"}, token=token)
        assert reply.status == 201, reply.body
        kernel_id = reply.body["id"]
        host = agent

        def on_host() -> int:
            return host.call("GET", "/api/host").status

        def on_gateway() -> int:
            return gateway.call("GET", f"/api/kernels/{kernel_id}", token=token).status

        for protocol in (None, V1):
            sent = asyncio.run(fuzz(gateway.url, token, kernel_id, protocol, [on_host, on_gateway]))
            assert sent >= 50, f"only {sent} frames in {SECONDS} s"
            out = asyncio.run(run_code(gateway.url, token, kernel_id, "print(6 * 7)", protocol))
            assert out == "42\n", f"seed {SEED}"
    finally:
        if agent is not None:
            agent.stop()
        gateway.stop()
