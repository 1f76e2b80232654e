"""A stock `jupyter server --gateway-url=...` (no gpupool code on the client side) in front of the
embedded stack: kernelspecs, kernels, sessions and the kernel websocket all pass through it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Gateway, HostAgent, free_port
from kernel_ws import V1, KernelSocket, run_code

from gpu_host.gpus import FakeInventory

SPEC = "python3-gpu-h100-x1"
PIN = 'import os; print(os.environ["CUDA_VISIBLE_DEVICES"])'


def h100_uuids() -> set[str]:
    """The stack's host serves fake GPUs whose UUIDs are stable for this machine."""
    return {g.uuid for g in FakeInventory("H100:2,A10G:1", socket.gethostname()).devices() if
            g.gpu_type == "H100"}  # fmt: skip


@dataclass
class StockServer:
    """A stock jupyter_server in gateway mode, seen by a browser holding its own token."""

    proc: subprocess.Popen[str]
    url: str
    token: str
    log_path: Path

    call = HostAgent.call
    log = HostAgent.log
    stop = HostAgent.stop


def start_stock_server(
    tmp_path: Path, gateway_url: str, gateway_token: str, token: str = "stock-server-token"
) -> StockServer:
    """`jupyter server --gateway-url=URL --GatewayClient.auth_token=T`, as a user would run it
    (token "": its own auth off, for clients that cannot send one; loopback only)."""
    port = free_port()
    log_path = tmp_path / "jupyter-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "data")
    command = [sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
               "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
               f"--gateway-url={gateway_url}", f"--GatewayClient.auth_token={gateway_token}",
               "--GatewayClient.request_timeout=60", f"--ServerApp.root_dir={tmp_path}",
               "--allow-root", "--ServerApp.jpserver_extensions=jupyter_ext=False"]  # fmt: skip
    if not token:  # a client with no token has no _xsrf cookie either
        command.append("--ServerApp.disable_check_xsrf=True")
    log = open(log_path, "w")  # the process writes it until it ends
    proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path
    )
    server = StockServer(proc, f"http://127.0.0.1:{port}", token, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"jupyter server exited with {proc.returncode}: {server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/api/status?token={token}", timeout=5):
                return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise AssertionError(f"jupyter server did not answer within 60 s: {server.log()}")


@pytest.fixture(scope="module")
def server(stack: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StockServer]:
    stock = start_stock_server(tmp_path_factory.mktemp("stock"), stack.url, stack.token)
    yield stock
    stock.stop()


def gateway_ids(stack: Gateway) -> set[str]:
    reply = stack.call("GET", "/api/kernels")
    assert reply.status == 200, reply.body
    return {k["id"] for k in reply.body}


def start_kernel(server: StockServer, name: str = SPEC) -> str:
    reply = server.call("POST", "/api/kernels", {"name": name})
    assert reply.status == 201, (reply.body, server.log())
    return str(reply.body["id"])


def shut_down(server: StockServer, stack: Gateway, kernel_id: str) -> None:
    reply = server.call("DELETE", f"/api/kernels/{kernel_id}")
    assert reply.status == 204, (reply.body, server.log())
    assert kernel_id not in gateway_ids(stack)
    assert stack.call("GET", f"/api/kernels/{kernel_id}").status == 404


def test_kernelspecs_come_from_the_gateway(server: StockServer) -> None:
    reply = server.call("GET", "/api/kernelspecs")
    assert reply.status == 200, (reply.body, server.log())
    specs = reply.body["kernelspecs"]
    assert {"python3", SPEC, "python3-gpu-h100-x2", "python3-gpu-a10g-x1"} <= set(specs)
    gpupool = specs[SPEC]["spec"]["metadata"]["gpupool"]
    assert gpupool["gpu_type"] == "H100" and gpupool["gpu_count"] == 1
    assert gpupool["usd_per_hour"] > 0 and gpupool["memory_gb"] == 80
    assert "H100" in specs[SPEC]["spec"]["display_name"]
    one = server.call("GET", f"/api/kernelspecs/{SPEC}")  # the ?user=NAME/spec form upstream
    assert one.status == 200 and one.body["name"] == SPEC, one.body
    assert server.call("GET", "/api/kernelspecs/python3-gpu-nope-x1").status == 404
    assert server.call("GET", "/api/kernelspecs", token="wrong").status in (302, 401, 403)


def test_a_kernel_through_the_server_is_pinned_to_an_h100(
    server: StockServer, stack: Gateway
) -> None:
    kernel_id = start_kernel(server)
    try:
        at_gateway = stack.call("GET", f"/api/kernels/{kernel_id}")
        assert at_gateway.status == 200, at_gateway.body
        assert at_gateway.body["gpupool"]["gpu_type"] == "H100"
        assert at_gateway.body["gpupool"]["gpu_count"] == 1
        listed = server.call("GET", "/api/kernels")
        assert kernel_id in {k["id"] for k in listed.body}, listed.body
        model = server.call("GET", f"/api/kernels/{kernel_id}")
        assert model.status == 200 and model.body["name"] == SPEC, model.body

        out = asyncio.run(run_code(server.url, server.token, kernel_id, PIN)).strip()
        assert out in h100_uuids(), (out, h100_uuids())

        # A second H100 kernel gets the other H100, not the same one.
        other = start_kernel(server)
        try:
            second = asyncio.run(run_code(server.url, server.token, other, PIN)).strip()
            assert second in h100_uuids() and second != out
        finally:
            shut_down(server, stack, other)

        assert server.call("POST", f"/api/kernels/{kernel_id}/interrupt").status == 204
        restarted = server.call("POST", f"/api/kernels/{kernel_id}/restart")
        assert restarted.status == 200, (restarted.body, server.log())
        again = asyncio.run(run_code(server.url, server.token, kernel_id, PIN)).strip()
        assert again == out  # a restart keeps the kernel's GPU
    finally:
        shut_down(server, stack, kernel_id)


def test_both_framings_through_the_server(server: StockServer, stack: Gateway) -> None:
    """jupyter_server in gateway mode speaks only the legacy JSON framing to the browser: a
    browser that offers v1 is answered without a subprotocol and must (and does) fall back."""

    async def check(kernel_id: str) -> None:
        for protocol in (None, V1):
            sock = await KernelSocket.open(server.url, server.token, kernel_id, protocol)
            try:
                assert sock.protocol is None  # legacy, whatever was offered
                info = await sock.kernel_info()
                assert info["content"]["status"] == "ok"
                assert info["channel"] == "shell"
                out, reply = await sock.execute("print(sum(i * i for i in range(10)))")
                assert reply["status"] == "ok" and out.strip() == "285", out
            finally:
                sock.close()
        # The gateway itself speaks v1 to a client that asks for it.
        sock = await KernelSocket.open(stack.url, stack.token, kernel_id, V1)
        try:
            assert sock.protocol == V1
            out, reply = await sock.execute("print('v1 ok')")
            assert reply["status"] == "ok" and out.strip() == "v1 ok", out
        finally:
            sock.close()

    kernel_id = start_kernel(server, "python3-gpu-a10g-x1")
    try:
        asyncio.run(check(kernel_id))
    finally:
        shut_down(server, stack, kernel_id)


def test_sessions_api(server: StockServer, stack: Gateway) -> None:
    body = {"path": "work/train.ipynb", "name": "train.ipynb", "type": "notebook",
            "kernel": {"name": SPEC}}  # fmt: skip
    created = server.call("POST", "/api/sessions", body)
    assert created.status == 201, (created.body, server.log())
    session_id, kernel = created.body["id"], created.body["kernel"]
    assert kernel["name"] == SPEC
    try:
        assert kernel["id"] in gateway_ids(stack)
        listed = server.call("GET", "/api/sessions")
        assert [s["id"] for s in listed.body] == [session_id], listed.body
        out = asyncio.run(run_code(server.url, server.token, kernel["id"], PIN)).strip()
        assert out in h100_uuids()
        renamed = server.call(
            "PATCH", f"/api/sessions/{session_id}", {"path": "work/renamed.ipynb"}
        )
        assert renamed.status == 200 and renamed.body["kernel"]["id"] == kernel["id"]
    finally:
        deleted = server.call("DELETE", f"/api/sessions/{session_id}")
    assert deleted.status == 204, (deleted.body, server.log())
    assert kernel["id"] not in gateway_ids(stack)
    assert server.call("GET", "/api/sessions").body == []


def test_a_queued_kernel_answers_at_once_and_runs_when_a_gpu_frees(
    server: StockServer, stack: Gateway
) -> None:
    """Both H100s held: a third H100 kernel is queued, yet the server gets its id at once, the
    browser's websocket opens at once, and the cell sent meanwhile runs once a GPU is free."""
    holders = [start_kernel(server), start_kernel(server)]
    queued = ""
    try:
        began = time.monotonic()
        queued = start_kernel(server)
        assert time.monotonic() - began < 10
        model = stack.call("GET", f"/api/kernels/{queued}").body
        assert model["gpupool"]["state"] == "queued", model
        assert model["execution_state"] == "starting"
        listed = server.call("GET", "/api/kernels")
        assert queued in {k["id"] for k in listed.body}  # not culled while it waits

        async def run_after_release() -> str:
            sock = await KernelSocket.open(server.url, server.token, queued)
            try:
                task = asyncio.ensure_future(sock.execute(PIN, timeout=60))
                await asyncio.sleep(1)
                assert not task.done()
                freed = await asyncio.to_thread(server.call, "DELETE", f"/api/kernels/{holders[0]}")
                assert freed.status == 204
                out, reply = await task
                assert reply["status"] == "ok", out
                return out.strip()
            finally:
                sock.close()

        out = asyncio.run(run_after_release())
        assert out in h100_uuids()
        shut_down(server, stack, queued)
    finally:
        for kernel_id in [*holders, queued]:
            if kernel_id:
                server.call("DELETE", f"/api/kernels/{kernel_id}")
    assert not gateway_ids(stack)


def test_a_kernel_the_server_never_heard_of(server: StockServer) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    assert server.call("GET", f"/api/kernels/{missing}").status == 404
    assert server.call("DELETE", f"/api/kernels/{missing}").status == 404
