"""Per-tenant caps at the gateway: a tenant at its cap of open kernel websockets gets a 1013
close saying so, and one at its cap of requests in flight gets 429 with Retry-After; another
tenant meanwhile is served as usual."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Reply
from kernel_ws import KernelSocket
from pool_processes import gateway, join, started

__all__ = ["started"]  # a fixture, used by name


def test_a_tenant_at_its_websocket_cap_does_not_affect_another(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started, "--max-tenant-websockets", "3")
    join(tmp_path, started, gw)
    a, b = gw.tenant("a"), gw.tenant("b")
    a_kernel = gw.call("POST", "/api/kernels", {"name": "python3"}, token=a).body["id"]
    b_kernel = gw.call("POST", "/api/kernels", {"name": "python3"}, token=b).body["id"]

    async def scenario() -> None:
        held = [await KernelSocket.open(gw.url, b, b_kernel) for _ in range(3)]
        for sock in held:
            await sock.kernel_info()
        # B's fourth is closed at once, with the limit and what to do.
        extra = await KernelSocket.open(gw.url, b, b_kernel)
        assert await asyncio.wait_for(extra.conn.read_message(), 10) is None
        assert extra.conn.close_code == 1013, extra.conn.close_code
        reason = extra.conn.close_reason or ""
        assert "b has 3 kernel websockets open, its limit" in reason and "close some" in reason
        # A, meanwhile, opens up to its own cap and runs code in each.
        mine = [await KernelSocket.open(gw.url, a, a_kernel) for _ in range(3)]
        for n, sock in enumerate(mine):
            out, reply = await sock.execute(f"print({n} * 2)")
            assert reply["status"] == "ok" and out == f"{n * 2}\n"
        # B's held websockets still work; one closed frees a place for a new one.
        out, _ = await held[0].execute("print('b')")
        assert out == "b\n"
        held.pop().close()
        for _ in range(50):  # the gateway sees the close within moments
            again = await KernelSocket.open(gw.url, b, b_kernel)
            try:
                await again.kernel_info(timeout=5)
                break
            except ConnectionError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("a closed websocket did not free its place")
        for sock in [*held, *mine, again]:
            sock.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


@pytest.mark.slow
def test_a_tenant_at_its_request_cap_gets_429_and_another_is_served(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started, "--max-tenant-requests", "2")
    join(tmp_path, started, gw)
    a, b = gw.tenant("a"), gw.tenant("b")
    b_kernels = [gw.call("POST", "/api/kernels", {"name": "python3"}, token=b).body["id"]
                 for _ in range(2)]  # fmt: skip
    a_kernel = gw.call("POST", "/api/kernels", {"name": "python3"}, token=a).body["id"]

    def restart(token: str, kernel_id: str) -> Reply:
        return gw.call("POST", f"/api/kernels/{kernel_id}/restart", {}, token=token)

    # Restarts take the host a second or so: eight at once are more than B's two in flight.
    with ThreadPoolExecutor(10) as pool:
        b_replies = [pool.submit(restart, b, b_kernels[n % 2]) for n in range(8)]
        a_restart = pool.submit(restart, a, a_kernel)
        a_list = pool.submit(gw.call, "GET", "/api/kernels", None, a)
        statuses = sorted(r.result().status for r in b_replies)
        assert a_restart.result().status == 200, a_restart.result().body
        assert a_list.result().status == 200
    refused = [r.result() for r in b_replies if r.result().status == 429]
    assert len(refused) >= 4 and set(statuses) <= {200, 429}, statuses
    for reply in refused:
        assert reply.headers.get("Retry-After") == "1", reply.headers
        assert "b has 2 requests in flight, its limit" in reply.body["message"], reply.body
    # Once they are answered, B is served again: nothing stays counted.
    assert gw.call("GET", "/api/kernels", token=b).status == 200
    assert restart(b, b_kernels[0]).status == 200
