"""Every kernel websocket a Jupyter server with our extension serves has TCP_NODELAY set: a local
kernel and a pool kernel (through the pool provisioner's bridge) in a hybrid server, and a
gateway's kernel in gateway mode. Looked at inside the server, on the socket it accepted for
the test's websocket, by a test-only extension (tests/nodelay_probe.py). The same probe on a
stock jupyter_server (our extension disabled) sees Nagle on: what the extension changes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Gateway
from kernel_ws import KernelSocket
from test_lab_extension import LabServer, start_server

TESTS = Path(__file__).resolve().parent
POOL_SPEC = "python3-gpu-h100-x1"
WITHOUT_OURS = "--ServerApp.jpserver_extensions=jupyter_ext=False"


def probed_server(folder: Path, *args: str, env: dict[str, str] | None = None) -> LabServer:
    """`start_server` (our extension enabled as the wheel enables it) plus the probe."""
    conf_d = folder / "config" / "jupyter_server_config.d"
    conf_d.mkdir(parents=True)
    probe = {"ServerApp": {"jpserver_extensions": {"nodelay_probe": True}}}
    (conf_d / "nodelay_probe.json").write_text(json.dumps(probe))
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return start_server(folder, *args, env={**(env or {}), "PYTHONPATH": path})


@pytest.fixture(scope="module")
def hybrid(stack: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """No --gateway-url: local kernels, and the pool's kernelspecs synced beside them."""
    folder = tmp_path_factory.mktemp("hybrid")
    env = {"GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": stack.token,
           "JUPYTER_DATA_DIR": str(folder / "data")}  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "jupyter_ext.kernelspecs", "sync"], check=True, timeout=60,
        env={**os.environ, **env}, capture_output=True,
    )  # fmt: skip
    server = probed_server(folder, env=env)
    yield server
    server.stop()


def nodelay_of_a_kernel_websocket(server: LabServer, kernel_name: str) -> bool:
    """Start a kernel, open its websocket, get a kernel_info_reply over it, and ask the probe
    about the server's end of that websocket; the kernel is shut down after."""
    kernel_id = server.post("/api/kernels", {"name": kernel_name})["id"]

    async def probe() -> bool:
        sock = await KernelSocket.open(server.url, server.token, kernel_id)
        try:
            await sock.kernel_info(timeout=60)  # the server has run open() and connect()
            port = sock.conn.protocol.stream.socket.getsockname()[1]  # type: ignore[union-attr]
            status, text = await asyncio.to_thread(server.get, f"/nodelay-probe/{port}")
            assert status == 200, (status, text)
            return bool(json.loads(text)["nodelay"])
        finally:
            sock.close()

    try:
        return asyncio.run(probe())
    finally:
        server.delete(f"/api/kernels/{kernel_id}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kernel_name", ["python3", POOL_SPEC])
def test_hybrid_server_kernel_websockets_have_nodelay(hybrid: LabServer, kernel_name: str) -> None:
    assert nodelay_of_a_kernel_websocket(hybrid, kernel_name)


@pytest.mark.timeout(180)
def test_gateway_mode_kernel_websockets_have_nodelay(stack: Gateway, tmp_path: Path) -> None:
    server = probed_server(
        tmp_path, f"--gateway-url={stack.url}", env={"JUPYTER_GATEWAY_AUTH_TOKEN": stack.token}
    )
    try:
        assert nodelay_of_a_kernel_websocket(server, POOL_SPEC)
    finally:
        server.stop()
    assert "gpupool: /gpupool/ routes" in server.log_path.read_text()


@pytest.mark.timeout(180)
def test_without_our_extension_jupyter_server_leaves_nagle_on(tmp_path: Path) -> None:
    """The control: the probe is not always true, and the setting is ours, not stock's."""
    server = probed_server(tmp_path, WITHOUT_OURS)
    try:
        assert not nodelay_of_a_kernel_websocket(server, "python3")
    finally:
        server.stop()
    assert "gpupool: /gpupool/ routes" not in server.log_path.read_text()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("framing", [None, "v1.kernel.websocket.jupyter.org"])
def test_a_pool_kernels_browser_websocket_goes_straight_to_the_gateway(
    hybrid: LabServer, stack: Gateway, framing: str | None
) -> None:
    """jupyter_ext/pool_websocket.py: the browser's websocket of a pool kernel is the one
    websocket at the gateway (the bridge, which nobody in Lab talks to, holds none), not a ZMQ
    connection to the bridge; it runs code in either framing, Lab's kernel model shows the
    activity it relayed, and it ends at the gateway when the browser closes it."""
    kernel_id = hybrid.post("/api/kernels", {"name": POOL_SPEC})["id"]
    remote = next(k["id"] for k in stack.call("GET", "/api/kernels").body
                  if k["name"] == POOL_SPEC)  # fmt: skip

    def connections() -> int:
        return int(stack.call("GET", f"/api/kernels/{remote}").body["connections"])

    def lab_model() -> dict:
        status, text = hybrid.get(f"/api/kernels/{kernel_id}")
        assert status == 200, text
        return dict(json.loads(text))

    async def use() -> None:
        assert connections() == 0
        sock = await KernelSocket.open(hybrid.url, hybrid.token, kernel_id, framing)
        try:
            assert sock.protocol == framing
            before = lab_model()["last_activity"]
            out, reply = await sock.execute("import time; time.sleep(0.01); print(6 * 7)")
            assert reply["status"] == "ok" and out == "42\n", (out, reply)
            assert connections() == 1  # this one's, straight
            model = lab_model()
            assert model["execution_state"] == "idle" and model["last_activity"] > before, model
        finally:
            sock.close()
        await asyncio.to_thread(stack.wait_for, lambda: connections() == 0, 30, "closed")

    try:
        asyncio.run(use())
    finally:
        hybrid.delete(f"/api/kernels/{kernel_id}")
