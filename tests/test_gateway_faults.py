"""Faults between the gateway and its hosts: a host that dies, a gateway that dies, a host that
stops answering for a while and comes back. Real processes on loopback, fake GPUs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import Gateway, HostAgent, start_gateway, start_host
from kernel_ws import run_code
from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse

from gpupool.wire import iso
from kernel_gateway.kernels import GatewayKernels
from kernel_gateway.pool import HostView, Pool
from kernel_gateway.reconcile import HostReconciler
from kernel_gateway.store import Host, Kernel, Tenant, open_store
from kernel_gateway.suspension import Suspensions

pytestmark = pytest.mark.slow

H100_X1 = "python3-gpu-h100-x1"
HOST_TIMEOUT = 2.0


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Everything a test starts (gateways, hosts), stopped at its end whatever happened."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if thing.proc.poll() is None:
            os.kill(thing.proc.pid, signal.SIGCONT)  # a test may leave a host stopped
        thing.stop()


def gateway(tmp_path: Path, started: list[Any], **kwargs: Any) -> Gateway:
    gw = start_gateway(
        tmp_path, "--host-timeout", str(HOST_TIMEOUT), state=tmp_path / "gw", **kwargs
    )
    started.append(gw)
    return gw


def join(tmp_path: Path, started: list[Any], gw: Gateway, gpus: str = "H100:2") -> HostAgent:
    folder = tmp_path / f"host-{len(started)}"
    folder.mkdir()
    agent = start_host(
        folder, "--fake-gpus", gpus, "--no-isolate", "--gateway", gw.url,
        f"--join-token={gw.join_token}", "--heartbeat-seconds", "0.5",
    )  # fmt: skip
    started.append(agent)
    gw.wait_for(lambda: any(h["url"] == agent.url and not h["lost"] for h in hosts(gw)),
                15, "the host to register")  # fmt: skip
    return agent


def hosts(gw: Gateway) -> list[dict[str, Any]]:
    reply = gw.call("GET", "/api/hosts", token=gw.admin_token)
    assert reply.status == 200, reply.body
    return list(reply.body)


def kernel(gw: Gateway, kernel_id: str) -> dict[str, Any]:
    reply = gw.call("GET", f"/api/kernels/{kernel_id}")
    assert reply.status == 200, reply.body
    return dict(reply.body)


def state_of(gw: Gateway, kernel_id: str) -> str:
    return str(kernel(gw, kernel_id)["gpupool"]["state"])


def running_kernel(gw: Gateway) -> str:
    gw.token = gw.tenant("a")
    model = gw.create(name=H100_X1)
    assert model["gpupool"]["state"] == "running", model
    assert asyncio.run(run_code(gw.url, gw.token, model["id"], "x = 41")) == ""
    return str(model["id"])


def alive_on(agent: HostAgent) -> set[str]:
    """The host's own ids of the kernels it runs for clients (warm ones are not listed)."""
    return {k["id"] for k in agent.call("GET", "/api/kernels").body
            if k["execution_state"] != "dead"}  # fmt: skip


def listed(gw: Gateway) -> set[str]:
    return {k["id"] for k in gw.call("GET", "/api/kernels").body}


def test_a_killed_host_is_lost_with_its_kernels(tmp_path: Path, started: list[Any]) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    asked = time.time()
    kernel_id = running_kernel(gw)
    running_at = time.time()  # its start's answer is a sign of life too, maybe after a heartbeat
    [view] = hosts(gw)
    assert view["gpus"]["H100"] == {"total": 2, "free": 1}

    # The agent's kernels are its children (in their own sessions): kill them with it.
    children = psutil.Process(agent.proc.pid).children(recursive=True)
    assert children, "the host should run kernel processes"
    agent.proc.kill()
    agent.proc.wait(10)
    for child in children:  # each kernel leads its own session: kill what it started too
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    killed = time.monotonic()

    gw.wait_for(lambda: state_of(gw, kernel_id) == "dead", HOST_TIMEOUT + 4, "the kernel to die")
    assert time.monotonic() - killed < HOST_TIMEOUT + 2.5
    model = kernel(gw, kernel_id)
    assert model["execution_state"] == "dead"
    assert view["name"] in model["gpupool"]["reason"], model
    assert "stopped answering" in model["gpupool"]["reason"], model
    # jupyter_server drops a kernel missing from the list: a dead one leaves it.
    assert kernel_id not in listed(gw)
    # Its GPUs left the pool; the admin sees the host lost.
    assert gw.call("GET", "/api/gpus").body == []
    [view] = hosts(gw)
    assert view["lost"] is True
    # A new request for a GPU the pool no longer has is refused with words, not queued forever.
    reply = gw.call("POST", "/api/kernels", {"name": H100_X1})
    assert reply.status == 400, reply.body
    assert "no H100" in reply.body["message"]
    # Billing ended at the last sign of life (a heartbeat, or the start's answer), not when the
    # gateway noticed, HOST_TIMEOUT later.
    billed = model["gpupool"]["billed_seconds"]
    assert 0 <= billed <= max(view["last_seen"], running_at) - asked + 0.05, model
    # Its owner can still shut the dead kernel down; then it is gone for good.
    assert gw.call("DELETE", f"/api/kernels/{kernel_id}").status == 204
    assert gw.call("GET", f"/api/kernels/{kernel_id}").status == 404


def test_a_gateway_restart_keeps_kernels_and_their_variables(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started)
    join(tmp_path, started, gw)
    kernel_id = running_kernel(gw)
    other = gw.create(name=H100_X1)["id"]
    waiting = [gw.create(name=H100_X1)["id"] for _ in range(2)]
    assert [state_of(gw, k) for k in waiting] == ["queued", "queued"]
    token, port = gw.token, urlsplit(gw.url).port
    assert port

    gw.proc.kill()
    gw.proc.wait(10)
    again = gateway(tmp_path, started, port=port)
    again.token = token
    assert again.url == gw.url

    # The host keeps heartbeating to the same address; the new process knows it from SQLite.
    again.wait_for(lambda: hosts(again) and not hosts(again)[0]["lost"], 10, "the host")
    model = kernel(again, kernel_id)
    assert model["gpupool"]["state"] == "running", model
    assert kernel_id in listed(again)
    assert asyncio.run(run_code(again.url, token, kernel_id, "print(x + 1)")) == "42\n"
    # Heartbeats after the restart do not take the kernel for dead, and its GPU stays held.
    time.sleep(1.2)
    assert state_of(again, kernel_id) == "running"
    assert hosts(again)[0]["gpus"]["H100"] == {"total": 2, "free": 0}
    # The queue survived too, in order, and moves when a GPU frees.
    positions = [kernel(again, k)["gpupool"].get("queue_position") for k in waiting]
    assert positions == [1, 2]
    assert again.call("DELETE", f"/api/kernels/{other}").status == 204
    again.wait_for(lambda: state_of(again, waiting[0]) == "running", 20, "the queue to move")
    assert kernel(again, waiting[1])["gpupool"]["queue_position"] == 1


def test_after_a_restart_nothing_is_placed_on_a_host_not_yet_heard_from(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    token, port = gw.token, urlsplit(gw.url).port
    gw.proc.kill()
    gw.proc.wait(10)
    os.kill(agent.proc.pid, signal.SIGSTOP)  # silent: it may be gone, for all the gateway knows
    try:
        again = gateway(tmp_path, started, port=port)
        again.token = token
        model = again.create(name=H100_X1)
        # Its GPUs still count (no 400), but the kernel waits instead of starting on it.
        assert model["gpupool"]["state"] == "queued", model
        time.sleep(0.5)
        assert state_of(again, model["id"]) == "queued"
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    # The host's next heartbeat (or registration) proves it alive: the kernel starts there.
    again.wait_for(lambda: state_of(again, model["id"]) == "running", 15, "the kernel to start")
    assert asyncio.run(run_code(again.url, token, model["id"], "print(1 + 1)")) == "2\n"


def test_a_host_kernel_no_gateway_kernel_uses_is_stopped(
    tmp_path: Path, started: list[Any]
) -> None:
    """A start cut short (the gateway crashed, or its answer never came) leaves a kernel on the
    host that the gateway started but does not use: the next heartbeats stop it."""
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    kernel_id = running_kernel(gw)
    [used] = agent.call("GET", "/api/kernels").body
    assert used["gpupool"]["owner"] == kernel_id  # the gateway names itself in each start
    stranger = agent.create(name="python3")  # started on the host by someone else: not ours
    # As if the gateway had asked for it and then crashed: its owner is no kernel of the
    # gateway's. It may be stopped even before its start finishes (then the start is a 409).
    orphan = agent.call(
        "POST", "/api/kernels",
        {"name": "python3-gpu-h100-x1", "owner": "0f0e0d0c-0000-4000-8000-00000000abcd"},
    )  # fmt: skip
    assert orphan.status in (201, 409), orphan.body
    if orphan.status == 409:
        assert "shut down while it started" in orphan.body["message"]
    agent.wait_for(lambda: alive_on(agent) == {used["id"], stranger["id"]}, 10, "the orphan to go")
    assert "no kernel of this gateway uses it" in gw.log()
    time.sleep(1.2)  # two more heartbeats: nothing else is touched
    assert alive_on(agent) == {used["id"], stranger["id"]}
    assert state_of(gw, kernel_id) == "running"
    bad = agent.call("POST", "/api/kernels", {"name": "python3", "owner": "../x"})
    assert bad.status == 400 and "owner must be" in bad.body["message"]


def test_a_host_that_comes_back_gets_its_kernels_back(tmp_path: Path, started: list[Any]) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    kernel_id = running_kernel(gw)
    code = "import os; print(os.environ['GPUPOOL_TOKEN'])"
    own_token = asyncio.run(run_code(gw.url, gw.token, kernel_id, code)).strip()
    before = alive_on(agent)
    dropped = gw.create(name=H100_X1)  # shut down by its owner while the host is away
    [dropped_on_host] = alive_on(agent) - before

    # Heartbeats stop (the agent is frozen) for longer than the host timeout; kernels live on.
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        gw.wait_for(
            lambda: state_of(gw, kernel_id) == "dead", HOST_TIMEOUT + 4, "the kernel to be lost"
        )
        assert "stopped answering" in kernel(gw, kernel_id)["gpupool"]["reason"]
        assert kernel_id not in listed(gw)
        assert hosts(gw)[0]["lost"] is True
        assert gw.call("GET", "/api/gpus").body == []
        assert gw.call("DELETE", f"/api/kernels/{dropped['id']}").status == 204
        assert gw.call("GET", f"/api/kernels/{dropped['id']}").status == 404
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)

    # The agent hears 404 on its next heartbeat, registers again, and reports the kernel.
    gw.wait_for(lambda: state_of(gw, kernel_id) == "running", 10, "the kernel to come back")
    model = kernel(gw, kernel_id)
    assert model["gpupool"]["reason"] == ""
    assert model["execution_state"] in ("idle", "busy")
    assert kernel_id in listed(gw)
    [view] = hosts(gw)
    assert view["lost"] is False
    assert view["gpus"]["H100"] == {"total": 2, "free": 1}
    assert asyncio.run(run_code(gw.url, gw.token, kernel_id, "print(x + 1)")) == "42\n"
    # The same process came back, and with it the token it was given (for %%gpu inside it).
    assert gw.call("GET", "/api/kernels", token=own_token).status == 200
    # The kernel shut down while the host was away does not come back, and the host is told to
    # stop it, so its GPU serves the next request.
    assert gw.call("GET", f"/api/kernels/{dropped['id']}").status == 404
    agent.wait_for(lambda: dropped_on_host not in alive_on(agent), 10, "the host to stop it")
    assert gw.create(name=H100_X1)["gpupool"]["state"] == "running"


# -- races inside the gateway, driven directly with a host that answers when told to ------------


class SlowHost:
    """Stands in for a host's kernel API: starts wait for `release`; every call is recorded."""

    def __init__(self, fail_first: int | None = None) -> None:
        self.release = asyncio.Event()
        self.calls: list[tuple[str, str]] = []
        self.fail_first = fail_first
        self.started = 0

    async def __call__(
        self, host: HostView, method: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        self.calls.append((method, path))
        if method != "POST":
            return {}
        if self.fail_first is not None:
            code, self.fail_first = self.fail_first, None
            response = HTTPResponse(HTTPRequest(host.url), code, buffer=io.BytesIO(
                json.dumps({"message": "those GPUs are taken"}).encode()))  # fmt: skip
            raise HTTPClientError(code, response=response)
        await self.release.wait()
        self.started += 1
        return {"id": f"on-host-{self.started}", "execution_state": "idle",
                "gpupool": {"gpus": [f"GPU-{self.started}"]}}  # fmt: skip


def in_process_gateway(
    tmp_path: Path, host_api: Any, gpus: list[dict[str, Any]] | None = None
) -> tuple[GatewayKernels, HostView, Tenant]:
    """The gateway's kernels in this process, over one host ("box") whose API is `host_api`,
    with `gpus` (default: one H100, GPU-1), and one tenant "a"."""
    db = open_store(str(tmp_path / "gateway.db"))
    pool = Pool()
    host = HostView("0f0f0f0f-0000-0000-0000-000000000001", "box", "http://127.0.0.1:9", "t")
    host.update(gpus or [{"uuid": "GPU-1", "gpu_type": "H100", "memory_total": 80 << 30}])
    pool.hosts[host.id] = host
    with db() as s:
        s.add(Host(id=host.id, name=host.name, url=host.url, token=host.token, gpus=[]))
        tenant = Tenant(name="a")
        s.add(tenant)
        s.commit()
    kernels = GatewayKernels(db, pool, host_api)
    return kernels, host, tenant


def test_a_kernel_shut_down_while_its_host_starts_it_stays_down(tmp_path: Path) -> None:
    async def scenario() -> None:
        fake = SlowHost()
        kernels, host, tenant = in_process_gateway(tmp_path, fake)
        creating = asyncio.create_task(kernels.create(tenant, H100_X1, {}))
        await asyncio.sleep(0.05)
        [kernel_id] = kernels.live
        assert kernels.row(kernel_id).state == "starting"
        await kernels.delete(tenant, kernel_id)
        fake.release.set()  # the host's answer comes after the owner gave up on it
        await asyncio.wait_for(creating, 5)
        await asyncio.sleep(0.05)
        assert kernels.row(kernel_id).state == "deleted"
        assert host.held == {} and host.free("H100") == 1
        assert ("DELETE", "/api/kernels/on-host-1") in fake.calls  # not left running there

    asyncio.run(scenario())


def test_a_stale_host_answer_requeues_without_holding_the_client(tmp_path: Path) -> None:
    async def scenario() -> None:
        fake = SlowHost(fail_first=409)
        kernels, _host, tenant = in_process_gateway(tmp_path, fake)
        model = await asyncio.wait_for(kernels.create(tenant, H100_X1, {}), 5)
        assert model["gpupool"]["state"] == "queued", model
        assert model["gpupool"]["queue_position"] == 1

    asyncio.run(scenario())


def test_a_heartbeat_sent_before_a_start_does_not_kill_the_new_kernel(tmp_path: Path) -> None:
    async def scenario() -> None:
        fake = SlowHost()
        fake.release.set()
        kernels, host, tenant = in_process_gateway(tmp_path, fake)
        model = await kernels.create(tenant, H100_X1, {})
        assert model["gpupool"]["state"] == "running"
        # A heartbeat composed just before the host started the kernel arrives after its reply.
        HostReconciler(kernels).host_reported(host, [])
        assert kernels.row(model["id"]).state == "running"
        report = {"id": "on-host-1", "execution_state": "busy", "last_activity": iso(time.time())}
        HostReconciler(kernels).host_reported(host, [report])
        HostReconciler(kernels).host_reported(host, [])
        assert kernels.row(model["id"]).state == "running"
        # Missing from two reports in a row, it is gone.
        HostReconciler(kernels).host_reported(host, [])
        row = kernels.row(model["id"])
        assert row.state == "dead" and "no longer runs it" in row.reason
        assert host.held == {}

    asyncio.run(scenario())


class CheckpointingHost(SlowHost):
    """Starts at once, saves checkpoints, and holds each DELETE until `stopped` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release.set()
        self.stopped = asyncio.Event()

    async def __call__(
        self, host: HostView, method: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        if path.endswith("/checkpoint"):
            self.calls.append((method, path))
            return {"path": "/homes/a/.gpupool/checkpoints/x.pkl", "saved": ["x"]}
        if path.endswith("/restore"):
            self.calls.append((method, path))
            return {"restored": ["x"], "failed": {}}
        if method == "DELETE" and path.startswith("/api/kernels/"):
            self.calls.append((method, path))
            await self.stopped.wait()
            return {}
        if method == "POST" and path == "/api/kernels":  # one of the host's free GPUs
            self.calls.append((method, path))
            self.started += 1
            used = {u for gpus in host.held.values() for u in gpus}
            gpu = next(u for u in host.devices if u not in used)
            return {"id": f"on-host-{self.started}", "execution_state": "idle",
                    "gpupool": {"gpus": [gpu]}}  # fmt: skip
        return await super().__call__(host, method, path, body)


def test_a_resume_during_the_suspend_keeps_its_new_gpus(tmp_path: Path) -> None:
    """A client message while the host is still stopping the suspended kernel resumes it at
    once; the end of the suspend must not undo the new start's GPUs or reservation."""

    async def scenario() -> None:
        fake = CheckpointingHost()
        kernels, host, tenant = in_process_gateway(tmp_path, fake)
        host.update([{"uuid": f"GPU-{n}", "gpu_type": "H100"} for n in (1, 2)])
        kernel_id = (await kernels.create(tenant, H100_X1, {}))["id"]
        suspending = asyncio.create_task(Suspensions(kernels).suspend(kernel_id, "idle"))
        for _ in range(500):  # bounded: 5 s
            if ("DELETE", "/api/kernels/on-host-1") in fake.calls:
                break
            await asyncio.sleep(0.01)
        assert kernels.row(kernel_id).state == "suspended" and host.held == {}
        Suspensions(kernels).resume(
            kernel_id
        )  # the next cell, while the old host kernel is being stopped
        for _ in range(100):
            if kernels.row(kernel_id).state == "running":
                break
            await asyncio.sleep(0.01)
        fake.stopped.set()
        await asyncio.wait_for(suspending, 5)
        await asyncio.sleep(0.05)
        row = kernels.row(kernel_id)
        assert row.state == "running" and row.host_kernel_id == "on-host-2", row.reason
        assert len(row.gpus) == 1 and host.held == {kernel_id: row.gpus} and host.reserved == {}
        # Its new host kernel is not taken for an orphan by the next heartbeats.
        report = {"id": "on-host-2", "execution_state": "idle", "last_activity": iso(time.time()),
                  "gpupool": {"owner": kernel_id}}  # fmt: skip
        HostReconciler(kernels).host_reported(host, [report])
        await asyncio.sleep(0.05)
        assert ("DELETE", "/api/kernels/on-host-2") not in fake.calls

    asyncio.run(scenario())


def test_a_resume_refused_for_budget_stays_suspended_and_the_next_message_asks_again(
    tmp_path: Path,
) -> None:
    """A suspended kernel whose tenant reached its budget is not resumed: it stays suspended
    with its variables and says why, and the next client message asks again (it used to wait
    for a start that nobody had queued)."""

    async def scenario() -> None:
        fake = CheckpointingHost()
        fake.stopped.set()
        kernels, host, tenant = in_process_gateway(tmp_path, fake)
        kernel_id = (await kernels.create(tenant, H100_X1, {}))["id"]
        await Suspensions(kernels).suspend(kernel_id, "idle")

        def budget(usd: float | None) -> None:
            with kernels.db() as s:
                s.get(Tenant, tenant.id).budget_usd = usd  # type: ignore[union-attr]
                s.commit()

        budget(0.0)
        Suspensions(kernels).resume(kernel_id)  # what a client message on its websocket does
        await asyncio.sleep(0.05)
        row = kernels.row(kernel_id)
        assert row.state == "suspended" and row.reason.startswith("not resumed: tenant a has")
        assert row.checkpoint and kernels.live_of(kernel_id).suspended
        assert kernels.queued() == [] and host.held == {}
        budget(None)  # an admin raised it
        Suspensions(kernels).resume(kernel_id)
        for _ in range(200):  # bounded: 2 s
            if kernels.row(kernel_id).state == "running":
                break
            await asyncio.sleep(0.01)
        row = kernels.row(kernel_id)
        assert row.state == "running" and not kernels.live_of(kernel_id).suspended, row.reason
        assert ("POST", "/api/kernels/on-host-2/restore") in fake.calls

    asyncio.run(scenario())


def test_a_restart_while_the_kernel_resumes_starts_it_without_its_variables(
    tmp_path: Path,
) -> None:
    """Restart (Lab's Kernel > Restart) while a suspended kernel waits for its GPU or starts:
    the resume under way must not bring the old variables back."""

    class GatedStarts(CheckpointingHost):
        gate: asyncio.Event | None = None

        async def __call__(
            self, host: HostView, method: str, path: str, body: Any = None
        ) -> dict[str, Any]:
            if method == "POST" and path == "/api/kernels" and self.gate is not None:
                await self.gate.wait()
            return await super().__call__(host, method, path, body)

    async def scenario() -> None:
        fake = GatedStarts()
        fake.stopped.set()
        kernels, _host, tenant = in_process_gateway(tmp_path, fake)
        kernel_id = (await kernels.create(tenant, H100_X1, {}))["id"]
        suspensions = Suspensions(kernels)
        await suspensions.suspend(kernel_id, "idle")
        fake.gate = asyncio.Event()
        suspensions.resume(kernel_id)  # the next cell: the host starts it, slowly
        for _ in range(200):  # bounded: 2 s
            if kernels.row(kernel_id).state == "starting":
                break
            await asyncio.sleep(0.01)
        assert kernels.model(kernels.row(kernel_id))["gpupool"]["state"] == "resuming"
        await kernels.action(tenant, kernel_id, "restart")
        assert kernels.row(kernel_id).checkpoint == {}
        assert ("DELETE", "/api/checkpoints/a/on-host-1.pkl") in fake.calls
        fake.gate.set()
        for _ in range(200):
            if kernels.row(kernel_id).state == "running":
                break
            await asyncio.sleep(0.01)
        assert kernels.row(kernel_id).state == "running"
        assert not any(path.endswith("/restore") for _, path in fake.calls), fake.calls

    asyncio.run(scenario())


def test_while_the_checkpoint_runs_the_deadline_shown_is_the_one_that_passed(
    tmp_path: Path,
) -> None:
    class SlowCheckpoint(CheckpointingHost):
        saved = asyncio.Event()

        async def __call__(
            self, host: HostView, method: str, path: str, body: Any = None
        ) -> dict[str, Any]:
            if path.endswith("/checkpoint"):
                await self.saved.wait()
            return await super().__call__(host, method, path, body)

    async def scenario() -> None:
        fake = SlowCheckpoint()
        fake.stopped.set()
        kernels, _host, tenant = in_process_gateway(tmp_path, fake)
        kernel_id = (await kernels.create(tenant, H100_X1, {}))["id"]
        found_idle = time.time() - 0.1
        suspending = asyncio.create_task(
            Suspensions(kernels).suspend(kernel_id, "idle", since=found_idle)
        )
        await asyncio.sleep(0.05)
        kernels.live_of(kernel_id).execution_state = "busy"  # the checkpoint runs in the kernel
        model = kernels.model(kernels.row(kernel_id))
        assert model["gpupool"]["state"] == "running"
        assert model["gpupool"]["idle_deadline"] == iso(found_idle)  # not now + timeout
        fake.saved.set()
        await asyncio.wait_for(suspending, 5)
        model = kernels.model(kernels.row(kernel_id))
        assert (
            model["gpupool"]["state"] == "suspended" and model["gpupool"]["idle_deadline"] is None
        )

    asyncio.run(scenario())


def test_a_restart_during_the_checkpoint_stops_the_suspend_not_the_kernel(
    tmp_path: Path,
) -> None:
    class FailingCheckpoint(CheckpointingHost):
        restarted = asyncio.Event()

        async def __call__(
            self, host: HostView, method: str, path: str, body: Any = None
        ) -> dict[str, Any]:
            if path.endswith("/checkpoint"):
                await self.restarted.wait()
                response = HTTPResponse(HTTPRequest(host.url), 500, buffer=io.BytesIO(b"{}"))
                raise HTTPClientError(500, response=response)  # the kernel restarted under it
            if path.endswith("/restart"):
                self.calls.append((method, path))
                self.restarted.set()
                return {}
            return await super().__call__(host, method, path, body)

    async def scenario() -> None:
        fake = FailingCheckpoint()
        kernels, _host, tenant = in_process_gateway(tmp_path, fake)
        kernel_id = (await kernels.create(tenant, H100_X1, {}))["id"]
        suspending = asyncio.create_task(
            Suspensions(kernels).suspend(kernel_id, "idle", since=time.time())
        )
        await asyncio.sleep(0.05)
        await kernels.action(tenant, kernel_id, "restart")  # its user, through the REST API
        await asyncio.wait_for(suspending, 5)
        row = kernels.row(kernel_id)
        assert row.state == "running", row.reason  # not culled for a checkpoint it cut short
        assert not any(method == "DELETE" for method, _ in fake.calls)

    asyncio.run(scenario())


def test_a_host_kernel_of_a_kernel_shut_down_while_its_host_was_unreachable_is_stopped(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        fake = CheckpointingHost()
        fake.stopped.set()
        kernels, host, tenant = in_process_gateway(tmp_path, fake)
        kernel_id = (await kernels.create(tenant, H100_X1, {}))["id"]
        report = {"id": "on-host-1", "execution_state": "idle", "last_activity": iso(time.time()),
                  "gpupool": {"owner": kernel_id}}  # fmt: skip
        HostReconciler(kernels).host_reported(host, [report])
        await asyncio.sleep(0.05)
        assert ("DELETE", "/api/kernels/on-host-1") not in fake.calls  # in use: kept
        # Shut down by its owner, but the host's DELETE never arrived (it was unreachable):
        kernels.end(kernel_id, "shut down by its owner", state="deleted")
        HostReconciler(kernels).host_reported(host, [report])
        await asyncio.sleep(0.05)
        assert ("DELETE", "/api/kernels/on-host-1") in fake.calls

    asyncio.run(scenario())


def test_a_resume_waits_for_the_host_that_has_its_variables(tmp_path: Path) -> None:
    async def scenario() -> None:
        fake = CheckpointingHost()
        fake.stopped.set()
        kernels, keeper, tenant = in_process_gateway(tmp_path, fake)
        other = HostView("0f0f0f0f-0000-0000-0000-000000000002", "box2", "http://127.0.0.1:9", "t")
        other.update([{"uuid": "GPU-B", "gpu_type": "H100"}])
        kernels.pool.hosts[other.id] = other
        with kernels.db() as s:
            s.add(Host(id=other.id, name=other.name, url=other.url, token="t", gpus=[]))
            s.commit()
        resumed = (await kernels.create(tenant, H100_X1, {}))["id"]
        assert kernels.row(resumed).host_id == keeper.id
        await Suspensions(kernels).suspend(resumed, "idle")
        taker = (await kernels.create(tenant, H100_X1, {}))["id"]  # takes the keeper's GPU
        assert kernels.row(taker).host_id == keeper.id
        Suspensions(kernels).resume(resumed)
        await asyncio.sleep(0.05)
        # The other host is free, but its variables are not there: it waits.
        assert kernels.row(resumed).state == "queued" and other.free("H100") == 1
        await kernels.delete(tenant, taker)
        for _ in range(100):
            if kernels.row(resumed).state == "running":
                break
            await asyncio.sleep(0.01)
        row = kernels.row(resumed)
        assert row.state == "running" and row.host_id == keeper.id
        assert ("POST", f"/api/kernels/{row.host_kernel_id}/restore") in fake.calls

    asyncio.run(scenario())


def test_gpupool_tenant_beside_a_live_gateway_touches_only_tenants(tmp_path: Path) -> None:
    """The live gateway owns its kernels, queue and ledger: `gpupool tenant`, run in the same
    folder, must not take them over as a restarting gateway would."""
    db = open_store(str(tmp_path / "gateway.db"))
    with db() as s:
        tenant = Tenant(name="a")
        s.add(tenant)
        s.flush()
        s.add(Kernel(id="0f0e0d0c-0000-4000-8000-00000000abcd", tenant_id=tenant.id,
                     name=H100_X1, gpu_type="H100", gpu_count=1, state="starting"))  # fmt: skip
        s.commit()
    done = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "tenant", "--state-dir", str(tmp_path),
         "create", "bob"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with db() as s:
        assert s.get(Kernel, "0f0e0d0c-0000-4000-8000-00000000abcd").state == "starting"
        assert {t.name for t in s.query(Tenant)} == {"a", "bob"}


def test_a_host_late_with_heartbeats_but_answering_is_kept(
    tmp_path: Path, started: list[Any]
) -> None:
    """Heartbeats held up (a host or gateway busy with a burst of websockets) do not lose a host
    that still answers: every kernel on it would end. A host that stops answering is lost."""
    gw = gateway(tmp_path, started)
    folder = tmp_path / "slow-host"
    folder.mkdir()
    agent = start_host(
        folder, "--fake-gpus", "H100:2", "--no-isolate", "--gateway", gw.url,
        f"--join-token={gw.join_token}", "--heartbeat-seconds", "60",
    )  # fmt: skip
    started.append(agent)
    gw.wait_for(lambda: any(not h["lost"] for h in hosts(gw)), 15, "the host to register")
    kernel_id = running_kernel(gw)
    time.sleep(HOST_TIMEOUT * 3)  # no heartbeat all along: each late check probes the host
    assert [h["lost"] for h in hosts(gw)] == [False]
    assert state_of(gw, kernel_id) != "dead"

    os.kill(agent.proc.pid, signal.SIGSTOP)  # frozen: it answers nothing
    gw.wait_for(lambda: hosts(gw)[0]["lost"], HOST_TIMEOUT + 10, "the frozen host to be lost")
    assert state_of(gw, kernel_id) == "dead"


def test_restarts_of_one_kernel_at_once_all_succeed(tmp_path: Path, started: list[Any]) -> None:
    """Two tabs (or a double click) restarting one kernel at once: each restart is done in turn,
    none is a 502 from the host refusing a restart while one is under way."""
    gw = gateway(tmp_path, started)
    join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    kernel_id = gw.create(name="python3")["id"]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(
            lambda _: gw.call("POST", f"/api/kernels/{kernel_id}/restart", {}), range(4)
        ))  # fmt: skip
    assert [r.status for r in replies] == [200] * 4, [r.body for r in replies]
    assert asyncio.run(run_code(gw.url, gw.token, kernel_id, "print(6 * 7)")) == "42\n"
