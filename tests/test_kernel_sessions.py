"""Two websockets of one session at the gateway, as stock JupyterLab in gateway mode leaves them
when Chromium drops its first connection (no subprotocol in the answer): Lab's server keeps that
one open to the gateway, never using it, and reconnects at once with the same session id. The
connection the client sends on must be the one that works, whichever arrived first."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from conftest import Gateway
from kernel_ws import KernelSocket, ws_url
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

REPLACED = "another connection of the same session is in use"


async def open_socket(stack: Gateway, kernel_id: str, session: str) -> KernelSocket:
    """A legacy-framed kernel websocket (as Lab's server opens it) with the given session id."""
    request = HTTPRequest(
        ws_url(stack.url, kernel_id) + f"?session_id={session}",
        headers={"Authorization": f"token {stack.token}"},
    )
    return KernelSocket(await websocket_connect(request), None)


@pytest.fixture
def kernel(stack: Gateway) -> Iterator[str]:
    reply = stack.call("POST", "/api/kernels", {"name": "python3-gpu-h100-x1"})
    assert reply.status == 201, reply.body
    yield str(reply.body["id"])
    stack.call("DELETE", f"/api/kernels/{reply.body['id']}")


async def closed(sock: KernelSocket, timeout: float = 10) -> tuple[int | None, str | None]:
    while await asyncio.wait_for(sock.conn.read_message(), timeout) is not None:
        pass
    return sock.conn.close_code, sock.conn.close_reason


@pytest.mark.parametrize("left_first", [True, False], ids=["left-first", "used-first"])
def test_the_connection_a_client_sends_on_is_relayed(
    stack: Gateway, kernel: str, left_first: bool
) -> None:
    """`left-first`: Lab's order, both opened while the kernel starts. `used-first`: the one in
    use is already running cells when the left one arrives (before the fix, the host replaced the
    one in use by the newer, and the gateway closed it with 1011)."""

    async def check() -> None:
        session = str(uuid.uuid4())
        if left_first:
            left = await open_socket(stack, kernel, session)
            used = await open_socket(stack, kernel, session)
        else:
            used = await open_socket(stack, kernel, session)
            await used.kernel_info()
            left = await open_socket(stack, kernel, session)
            await asyncio.sleep(0.5)  # time for the left one to reach the host, if relayed
        out, reply = await used.execute("print(1 + 1)", timeout=30)
        assert (out, reply["status"]) == ("2\n", "ok")
        assert await closed(left) == (1000, REPLACED)
        out, reply = await used.execute("print(2 + 2)", timeout=30)
        assert (out, reply["status"]) == ("4\n", "ok")
        used.close()

    asyncio.run(check())
