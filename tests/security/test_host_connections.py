"""Open websockets are capped per kernel, per tenant and per host with a clear 1013 close, and the
host raises its open-file limit, so one tenant at its cap leaves the others' connections be."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kernel_ws import V1, KernelSocket, run_code
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect


@contextlib.contextmanager
def open_files_limit(soft: int) -> Iterator[None]:
    """Start processes (which inherit it) under a lower soft open-file limit."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, before[1]), before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def limits_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit")


async def try_open(agent: Any, kernel_id: str, protocol: str | None = None) -> Any:
    """An open websocket, or the (code, reason) it was closed with at once."""
    sock = await KernelSocket.open(agent.url, agent.token, kernel_id, protocol)
    info = asyncio.ensure_future(sock.kernel_info(30))
    await asyncio.wait([info])
    if info.exception() is None:
        return sock
    return sock.conn.close_code, sock.conn.close_reason


def test_caps_per_kernel_and_tenant_close_with_1013_and_spare_other_tenants(host_factory):
    with open_files_limit(1024):
        agent = host_factory(
            "--fake-gpus", "H100:1", "--no-isolate", "--warm-per-shape", "0",
            "--max-websockets-per-kernel", "3", "--max-websockets-per-tenant", "5",
        )  # fmt: skip
    soft, hard = limits_of(agent.proc.pid)
    assert soft == hard, "the host raises its soft open-file limit to the hard one"
    a1, a2 = (agent.create(name="python3", tenant="a")["id"] for _ in range(2))
    b1 = agent.create(name="python3", tenant="b")["id"]

    async def scenario() -> None:
        first = [await try_open(agent, a1) for _ in range(3)]
        assert all(isinstance(s, KernelSocket) for s in first)
        assert await try_open(agent, a1, V1) == (
            1013, "too many connections to this kernel: 3 open, limit 3; close some tabs"
        )  # fmt: skip
        second = [await try_open(agent, a2) for _ in range(2)]
        assert all(isinstance(s, KernelSocket) for s in second)
        code, reason = await try_open(agent, a2)
        assert code == 1013 and "5 open, limit 5; close some tabs" in reason, reason
        # A reconnect of an open session replaces it rather than taking a new place.
        url = first[2].conn.request.url.replace("http", "ws", 1)  # the same session_id
        headers = {"Authorization": f"token {agent.token}"}
        replacing = await websocket_connect(HTTPRequest(url, headers=headers))
        while await asyncio.wait_for(first[2].conn.read_message(), 30) is not None:
            pass  # the stale one is closed
        first[2] = KernelSocket(replacing, None)
        assert (await first[2].execute("print(5)"))[0] == "5\n"
        # Tenant a at its cap: tenant b connects and runs code as ever.
        assert await run_code(agent.url, agent.token, b1, "print(7)") == "7\n"
        # A closed websocket gives its place back.
        first[0].close()
        for _ in range(100):
            again = await try_open(agent, a1)
            if isinstance(again, KernelSocket):
                break
            await asyncio.sleep(0.1)
        assert isinstance(again, KernelSocket), again
        assert (await again.execute("print(8)"))[0] == "8\n"
        for sock in [*first[1:], *second, again]:
            sock.close()

    asyncio.run(scenario())


def test_two_hundred_websockets_to_one_kernel(host_factory):
    """Under a soft open-file limit of 1024 this used to end in timeouts, 1011s and "Too many
    open files": now the first 128 connect and the rest are told why, at once."""
    with open_files_limit(1024):
        agent = host_factory("--fake-gpus", "H100:1", "--no-isolate", "--warm-per-shape", "0")
    kernel_id = agent.create(name="python3", tenant="a")["id"]
    other = agent.create(name="python3", tenant="b")["id"]

    async def scenario() -> list[Any]:
        opened = []
        for start in range(0, 200, 20):  # in bursts of 20
            batch = [try_open(agent, kernel_id, V1) for _ in range(20)]
            opened += await asyncio.gather(*batch)
            del start
        assert await run_code(agent.url, agent.token, other, "print(9)") == "9\n"
        for sock in opened:
            if isinstance(sock, KernelSocket):
                sock.close()
        return opened

    opened = asyncio.run(scenario())
    refused = [s for s in opened if not isinstance(s, KernelSocket)]
    assert "Too many open files" not in agent.log_path.read_text()
    assert all(s[0] == 1013 and "limit 128" in s[1] for s in refused), refused[:3]
    assert len(opened) - len(refused) == 128
