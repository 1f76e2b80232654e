"""examples/gpu-kernel.ipynb run headless by nbclient on a GPU kernel of the embedded stack, with
jupyter_server's own gateway kernel manager: what papermill and CI jobs use against a gateway.

Two upstream gaps in jupyter_server's `GatewayKernelClient` (2.x) shape these tests:
- it opens the kernel websocket with no headers at all, so `GatewayClient.auth_token` never reaches
  the gateway's websocket. Directly against gpupool (which requires the token) the test uses
  `jupyter_ext.gateway_client.TokenGatewayKernelClient`, which sends it; through a stock
  jupyter_server on loopback with its own auth off, nothing is patched.
- `GatewayKernelManager.start_kernel` ignores the manager's `kernel_name` and starts `python3`
  unless `kernel_name` is passed to `start_kernel`, so the notebook's kernelspec is passed on.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import REPO, Gateway
from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.gateway.managers import GatewayKernelManager
from nbclient import NotebookClient
from test_stock_jupyter_server import start_stock_server

from gpu_host.gpus import FakeInventory
from jupyter_ext.gateway_client import TokenGatewayKernelClient

NOTEBOOK = REPO / "examples" / "gpu-kernel.ipynb"
UUID = r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture
def gateway_client() -> Iterator[Any]:
    """Configure jupyter_server's GatewayClient singleton for one test, and forget it after."""

    def configure(url: str, token: str) -> GatewayClient:
        GatewayClient.clear_instance()
        return GatewayClient.instance(url=url, auth_token=token, request_timeout=60.0)

    yield configure
    GatewayClient.clear_instance()


def run_notebook(km: GatewayKernelManager) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    kernel_name = nb.metadata["kernelspec"]["name"]
    assert kernel_name == "python3-gpu-h100-x1"
    client = NotebookClient(nb, km=km, timeout=60, startup_timeout=60, allow_errors=False)
    # nbclient leaves a kernel manager it was given running; cleanup_kc asks it to shut down.
    asyncio.run(client.async_execute(kernel_name=kernel_name, cleanup_kc=True))
    return nb


def check_outputs(nb: nbformat.NotebookNode) -> None:
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    found = re.search(rf"^CUDA_VISIBLE_DEVICES = ({UUID})$", text, re.M)
    assert found, text
    h100s = {g.uuid for g in FakeInventory("H100:2,A10G:1", socket.gethostname()).devices()
             if g.gpu_type == "H100"}  # fmt: skip
    assert found.group(1) in h100s
    assert "trace(a @ b) = 20388" in text and "primes below 10 000: 1229" in text
    summary = nb.cells[-1].outputs[0]
    assert summary.output_type == "execute_result"
    assert summary.data["text/plain"] == "{'gpus': 1, 'trace': 20388, 'primes': 1229}"
    assert [c.execution_count for c in nb.cells if c.cell_type == "code"] == [1, 2, 3]


def test_nbclient_with_the_gateway_kernel_manager(stack: Gateway, gateway_client: Any) -> None:
    gateway_client(stack.url, stack.token)
    km = GatewayKernelManager(client_factory=TokenGatewayKernelClient)
    nb = run_notebook(km)
    check_outputs(nb)
    listed = stack.call("GET", "/api/kernels").body
    assert listed == [], listed  # nbclient shut its kernel down at the end


def test_nbclient_through_a_stock_jupyter_server(
    stack: Gateway, gateway_client: Any, tmp_path: Path
) -> None:
    """nbclient -> stock jupyter_server (gateway mode) -> gpupool, with no patch anywhere."""
    server = start_stock_server(tmp_path, stack.url, stack.token, token="")
    try:
        gateway_client(server.url, "")
        nb = run_notebook(GatewayKernelManager())
        check_outputs(nb)
        assert stack.call("GET", "/api/kernels").body == []
    finally:
        server.stop()
