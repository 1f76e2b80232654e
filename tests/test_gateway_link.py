"""The agent's link to the gateway, against a small recording gateway on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from conftest import free_port
from kernel_ws import run_code
from tornado import web
from tornado.httpserver import HTTPServer

JOIN = "join-secret-for-tests"


class RecordingGateway:
    """Answers registration and heartbeats like the gateway will, and records every request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.rejected: list[str] = []
        self.tokens: dict[str, str] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        gateway = self

        class Register(web.RequestHandler):
            def post(self) -> None:
                if self.request.headers.get("Authorization") != f"token {JOIN}":
                    gateway.rejected.append("register")
                    raise web.HTTPError(401)
                host_id = f"host-{len(gateway.registrations) + 1}"
                gateway.tokens[host_id] = f"issued-{host_id}-{gateway.port}"
                gateway.registrations.append(json.loads(self.request.body))
                self.write({"host_id": host_id, "host_token": gateway.tokens[host_id]})

        class Heartbeat(web.RequestHandler):
            def post(self, host_id: str) -> None:
                if host_id not in gateway.tokens:
                    raise web.HTTPError(404)
                if self.request.headers.get("Authorization") != f"token {gateway.tokens[host_id]}":
                    gateway.rejected.append("heartbeat")
                    raise web.HTTPError(401)
                gateway.heartbeats.append({"host_id": host_id, **json.loads(self.request.body)})
                self.write({})

        app = web.Application(
            [(r"/api/hosts/register", Register), (r"/api/hosts/([^/]+)/heartbeat", Heartbeat)]
        )

        async def start() -> None:
            self.server = HTTPServer(app)
            self.server.listen(self.port, "127.0.0.1")
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def stop(self) -> None:
        async def close() -> None:
            self.server.stop()
            await self.server.close_all_connections()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def link_args(gateway_url: str) -> tuple[str, ...]:
    return ("--fake-gpus", "H100:2", "--no-isolate", "--gateway", gateway_url,
            "--join-token", JOIN, "--heartbeat-seconds", "0.3",
            "--HostAgent.gateway_max_backoff=0.5")  # fmt: skip


def test_registers_and_heartbeats_with_activity(host_factory):
    gateway = RecordingGateway(free_port())
    try:
        agent = host_factory(*link_args(gateway.url))
        wait(lambda: gateway.registrations, 20, "registration")
        # The agent adopts the issued token when the reply reaches it; a heartbeat shows it has.
        wait(lambda: gateway.heartbeats, 20, "the first heartbeat")
        registered = gateway.registrations[0]
        assert registered["url"] == agent.url
        assert registered["source"] == "fake"
        assert [g["gpu_type"] for g in registered["gpus"]] == ["H100", "H100"]
        assert all(g["uuid"].startswith("GPU-") for g in registered["gpus"])

        # The gateway reaches the agent with the token it issued, not the agent's own.
        issued = gateway.tokens["host-1"]
        reply = agent.call("POST", "/api/kernels", {"gpu_type": "H100"}, token=issued)
        assert reply.status == 201, reply.body
        model = reply.body
        assert asyncio.run(run_code(agent.url, issued, model["id"], "print('via gateway token')"))
        ran_at = time.time()

        def listed_after_the_cell() -> Any:
            after = [b for b in gateway.heartbeats if b["time"] > ran_at]
            return next((b for b in after for k in b["kernels"] if k["id"] == model["id"]), None)

        beat = wait(listed_after_the_cell, 10, "a heartbeat that lists the kernel")
        kernel = next(k for k in beat["kernels"] if k["id"] == model["id"])
        assert kernel["execution_state"] == "idle" and kernel["last_activity"].endswith("Z")
        assert kernel["gpupool"]["gpus"] == model["gpupool"]["gpus"]
        held = [g for g in beat["gpus"] if g["kernels"] == [model["id"]]]
        assert len(held) == 1 and "utilization" in held[0] and "memory_used" in held[0]
        count = len(gateway.heartbeats)
        time.sleep(1.0)
        assert len(gateway.heartbeats) >= count + 2, "heartbeats come every 0.3 s"
        assert gateway.rejected == []
    finally:
        gateway.stop()


def test_wrong_join_token_is_refused_and_the_agent_keeps_serving(host_factory):
    gateway = RecordingGateway(free_port())
    try:
        args = list(link_args(gateway.url))
        args[args.index(JOIN)] = "not-the-join-token"
        agent = host_factory(*args)
        wait(lambda: "register" in gateway.rejected, 20, "a refused registration")
        wait(lambda: "check --join-token" in agent.log(), 10, "the agent to say why")
        assert agent.create(gpu_type="H100")["gpupool"]["gpu_count"] == 1
    finally:
        gateway.stop()


def test_gateway_outage_keeps_kernels_and_the_agent_registers_again(host_factory):
    port = free_port()
    agent = host_factory(*link_args(f"http://127.0.0.1:{port}"))
    # No gateway yet: the agent serves kernels all the same.
    model = agent.create(gpu_type="H100")
    assert asyncio.run(run_code(agent.url, agent.token, model["id"], "x = 41; print(x)")) == "41\n"
    wait(lambda: "unreachable" in agent.log(), 10, "the agent to report the gateway unreachable")

    gateway = RecordingGateway(port)
    try:
        wait(lambda: gateway.heartbeats, 20, "registration once the gateway is up")
    finally:
        gateway.stop()
    # A restarted gateway that lost its memory answers 404: the agent registers again.
    restarted = RecordingGateway(port)
    try:
        wait(lambda: restarted.heartbeats, 20, "registration with the restarted gateway")
        ids = {k["id"] for k in restarted.registrations[-1]["kernels"]}
        assert model["id"] in ids, "a re-registering host reports the kernels it still runs"
    finally:
        restarted.stop()
    out = asyncio.run(run_code(agent.url, agent.token, model["id"], "print(x + 1)"))
    assert out == "42\n", "the kernel kept its state through the outage"
