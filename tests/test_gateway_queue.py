"""Waiting for a GPU at the gateway: the queue, messages held for a queued kernel, tenant caps,
best-fit placement, concurrent starts and the metrics. Real processes on loopback, fake GPUs."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, HostAgent, start_gateway, start_host
from kernel_ws import KernelSocket
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

H100_X1 = "python3-gpu-h100-x1"
H100_X2 = "python3-gpu-h100-x2"


@pytest.fixture
def started() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.stop()


def gateway(tmp_path: Path, started: list[Any]) -> Gateway:
    gw = start_gateway(tmp_path, state=tmp_path / "gw")
    started.append(gw)
    gw.token = gw.tenant("a")
    return gw


def join(tmp_path: Path, started: list[Any], gw: Gateway, gpus: str) -> HostAgent:
    folder = tmp_path / f"host-{len(started)}"
    folder.mkdir()
    agent = start_host(
        folder, "--fake-gpus", gpus, "--no-isolate", "--gateway", gw.url,
        f"--join-token={gw.join_token}", "--heartbeat-seconds", "0.5",
    )  # fmt: skip
    started.append(agent)
    gw.wait_for(lambda: agent.url in by_url(gw), 15, "the host to register")
    return agent


def by_url(gw: Gateway) -> dict[str, dict[str, Any]]:
    reply = gw.call("GET", "/api/hosts", token=gw.admin_token)
    assert reply.status == 200, reply.body
    return {h["url"]: h for h in reply.body}


def post(gw: Gateway, name: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    started = time.monotonic()
    reply = gw.call("POST", "/api/kernels", {"name": name, "env": {}}, token=token)
    assert time.monotonic() - started < 5, "POST /api/kernels must answer at once"
    return reply.status, reply.body


def model(gw: Gateway, kernel_id: str) -> dict[str, Any]:
    reply = gw.call("GET", f"/api/kernels/{kernel_id}")
    assert reply.status == 200, reply.body
    return dict(reply.body)


def metric(gw: Gateway, name: str) -> float:
    text = gw.call("GET", "/metrics", token=gw.admin_token).body
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics:\n{text}"
    return float(match[1])


async def recv_until(sock: KernelSocket, *wanted: tuple[str, str]) -> list[dict[str, Any]]:
    """Every message until each (parent msg_id, msg_type) in `wanted` has come. Shell replies
    and IOPub output travel on separate channels, so only their order within one is fixed."""
    seen: list[dict[str, Any]] = []
    missing = set(wanted)
    while missing:
        msg = await sock.recv(20)
        seen.append(msg)
        key = (msg["parent_header"].get("msg_id"), msg["msg_type"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] != "idle":
            continue
        missing.discard(key)
    return seen


def test_a_full_pool_queues_and_a_freed_gpu_starts_the_next(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started)
    join(tmp_path, started, gw, "H100:2")
    first, second = (post(gw, H100_X1)[1] for _ in range(2))
    assert first["gpupool"]["state"] == second["gpupool"]["state"] == "running"

    status, queued = post(gw, H100_X1)
    assert status == 201, queued
    assert queued["gpupool"]["state"] == "queued"
    assert queued["execution_state"] == "starting"
    assert queued["gpupool"]["queue_position"] == 1
    assert queued["gpupool"]["billed_seconds"] == 0
    listed = {k["id"]: k for k in gw.call("GET", "/api/kernels").body}
    assert set(listed) == {first["id"], second["id"], queued["id"]}
    assert listed[queued["id"]]["gpupool"]["state"] == "queued"
    # The pool, the kernelspec and the metrics all count the one waiting.
    [h100] = gw.call("GET", "/api/gpus").body
    assert (h100["total"], h100["free"], h100["queue"]) == (2, 0, 1)
    spec = gw.call("GET", f"/api/kernelspecs/{H100_X1}").body
    assert spec["spec"]["metadata"]["gpupool"]["queue"] == 1
    assert metric(gw, 'gpupool_kernels{state="running"}') == 2
    assert metric(gw, 'gpupool_kernels{state="queued"}') == 1
    assert metric(gw, "gpupool_queue_length") == 1
    assert metric(gw, 'gpupool_gpus{gpu_type="H100",use="free"}') == 0

    async def talk_while_queued() -> list[dict[str, Any]]:
        # The websocket opens at once; what it sends is held until the kernel runs.
        sock = await KernelSocket.open(gw.url, gw.token, queued["id"])
        try:
            first_id = await sock.send("shell", "execute_request", {"code": "a = 1"})
            second_id = await sock.send("shell", "execute_request", {"code": "print(a + 1)"})
            info_id = await sock.send("shell", "kernel_info_request", {})
            with pytest.raises(asyncio.TimeoutError):
                await sock.recv(0.5)  # nothing can answer yet
            assert model(gw, queued["id"])["gpupool"]["state"] == "queued"
            deleted = await asyncio.to_thread(gw.call, "DELETE", f"/api/kernels/{first['id']}")
            assert deleted.status == 204
            seen = await recv_until(sock, (info_id, "kernel_info_reply"), (second_id, "status"))
            shell = [m for m in seen if m["channel"] == "shell"]
            assert [m["parent_header"]["msg_id"] for m in shell] == [first_id, second_id, info_id]
            assert [m["content"]["status"] for m in shell] == ["ok", "ok", "ok"]
            return seen
        finally:
            sock.close()

    started_at = time.monotonic()
    seen = asyncio.run(talk_while_queued())
    assert time.monotonic() - started_at < 10
    out = [m["content"]["text"] for m in seen if m["msg_type"] == "stream"]
    assert out == ["2\n"]
    now = model(gw, queued["id"])
    assert now["gpupool"]["state"] == "running"
    assert "queue_position" not in now["gpupool"]
    assert gw.call("GET", f"/api/kernels/{first['id']}").status == 404
    assert metric(gw, 'gpupool_kernels{state="running"}') == 2
    assert metric(gw, "gpupool_queue_length") == 0


def test_tenant_caps_refuse_with_the_numbers(tmp_path: Path, started: list[Any]) -> None:
    gw = gateway(tmp_path, started)
    join(tmp_path, started, gw, "H100:2")
    two_gpus = gw.tenant("b", max_gpus=2)
    one_kernel = gw.tenant("c", max_kernels=1)

    status, held = post(gw, H100_X1, two_gpus)
    assert status == 201, held
    status, body = post(gw, H100_X2, two_gpus)
    assert status == 403, body
    assert body["message"] == (
        "tenant b may hold 2 GPUs, holds or waits for 1, and asked for 2 more."
    )
    # Queued kernels count too: the cap is on what a tenant holds or waits for.
    busy = post(gw, H100_X1)[1]
    assert post(gw, H100_X1)[1]["gpupool"]["state"] == "queued"  # tenant a fills the pool
    status, waiting = post(gw, H100_X1, two_gpus)
    assert status == 201 and waiting["gpupool"]["state"] == "queued", waiting
    status, body = post(gw, H100_X1, two_gpus)
    assert status == 403 and "holds or waits for 2" in body["message"], body
    # A tenant's shut down kernel no longer counts.
    assert gw.call("DELETE", f"/api/kernels/{busy['id']}").status == 204
    assert gw.call("DELETE", f"/api/kernels/{held['id']}", token=two_gpus).status == 204
    assert post(gw, H100_X1, two_gpus)[0] == 201

    status, cpu = post(gw, "python3", one_kernel)
    assert status == 201, cpu
    status, body = post(gw, "python3", one_kernel)
    assert status == 403, body
    assert body["message"] == "tenant c may have 1 kernels and has 1; shut one down first."
    assert body["reason"]


def test_best_fit_keeps_room_for_bigger_requests(tmp_path: Path, started: list[Any]) -> None:
    gw = gateway(tmp_path, started)
    small = join(tmp_path, started, gw, "H100:1")
    big = join(tmp_path, started, gw, "H100:2")
    assert gw.call("GET", "/api/gpus").body[0]["total"] == 3

    assert post(gw, H100_X1)[1]["gpupool"]["state"] == "running"
    hosts = by_url(gw)
    assert hosts[small.url]["gpus"]["H100"]["free"] == 0
    assert hosts[big.url]["gpus"]["H100"]["free"] == 2
    status, pair = post(gw, H100_X2)
    assert status == 201 and pair["gpupool"]["state"] == "running", pair
    assert by_url(gw)[big.url]["gpus"]["H100"]["free"] == 0
    # Each kernel landed on its own host, pinned to that host's GPUs.
    on_big = big.call("GET", "/api/kernels").body
    assert [len(k["gpupool"]["gpus"]) for k in on_big] == [2]
    assert [len(k["gpupool"]["gpus"]) for k in small.call("GET", "/api/kernels").body] == [1]


def test_concurrent_starts(tmp_path: Path, started: list[Any]) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw, "H100:8")

    async def burst(count: int) -> list[tuple[int, dict[str, Any]]]:
        client = AsyncHTTPClient()

        async def one() -> tuple[int, dict[str, Any]]:
            request = HTTPRequest(
                gw.url + "/api/kernels", method="POST", request_timeout=30,
                headers={"Authorization": f"token {gw.token}"},
                body=json.dumps({"name": H100_X1, "env": {}}),
            )  # fmt: skip
            response = await client.fetch(request, raise_error=False)
            return response.code, json.loads(response.body)

        return list(await asyncio.gather(*(one() for _ in range(count))))

    replies = asyncio.run(burst(8))
    assert [code for code, _ in replies] == [201] * 8, replies
    ids = {body["id"] for _, body in replies}
    assert len(ids) == 8
    assert {body["gpupool"]["state"] for _, body in replies} == {"running"}
    # Eight kernels on eight different GPUs, as the host itself tells.
    on_host = [k for k in agent.call("GET", "/api/kernels").body if k["execution_state"] != "dead"]
    gpus = [g for k in on_host for g in k["gpupool"]["gpus"]]
    assert len(on_host) == 8 and len(set(gpus)) == 8, on_host
    assert metric(gw, 'gpupool_kernels{state="running"}') == 8

    # A second burst on the full pool queues every one, each with its own place.
    more = asyncio.run(burst(4))
    assert [code for code, _ in more] == [201] * 4, more
    positions = sorted(body["gpupool"]["queue_position"] for _, body in more)
    assert positions == [1, 2, 3, 4]
    assert metric(gw, "gpupool_queue_length") == 4
    time.sleep(1.1)  # a few heartbeats: nothing running is taken for dead, nothing starts
    assert {model(gw, k)["gpupool"]["state"] for k in ids} == {"running"}
    assert metric(gw, 'gpupool_kernels{state="running"}') == 8
    assert metric(gw, "gpupool_queue_length") == 4
