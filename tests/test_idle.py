"""Idle kernels give their GPU back by themselves (suspend), and come back on the next cell."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import start_gateway, start_host
from kernel_ws import V1, KernelSocket, run_code

from kernel_gateway.up import host_state_dir

IDLE = {"KERNEL_IDLE_TIMEOUT": "3"}


def stamp(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def free_h100(stack) -> int:
    return next(g["free"] for g in stack.call("GET", "/api/gpus").body if g["gpu_type"] == "H100")


async def run(sock: KernelSocket, code: str) -> tuple[str, str]:
    msg_id = await sock.send("shell", "execute_request", {"code": code, "silent": False})
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    idle = False
    while not idle:
        msg = await sock.recv(120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out[msg["content"]["name"]].append(msg["content"]["text"])
        idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
    return "".join(out["stdout"]), "".join(out["stderr"])


def checkpoint_files(stack) -> set[Path]:
    # Where `gpupool up` keeps its host's tenant folders (outside the state folder as root).
    return set(host_state_dir(stack.state_dir.resolve()).rglob("checkpoints/*.pkl"))


def test_an_idle_kernel_is_suspended_and_the_next_cell_resumes_it(stack):
    free_before = free_h100(stack)
    files_before = checkpoint_files(stack)
    model = stack.create(name="python3-gpu-h100-x1", env=IDLE)
    kernel_id = model["id"]
    assert model["gpupool"]["idle_timeout"] == 3.0

    deadline_seen: list[float] = []

    async def scenario() -> tuple[dict, str, str, dict]:
        sock = await KernelSocket.open(stack.url, stack.token, kernel_id)
        await run(sock, "x = 41\ngen = (i for i in range(3))")
        deadline = stamp(
            stack.call("GET", f"/api/kernels/{kernel_id}").body["gpupool"]["idle_deadline"]
        )
        deadline_seen.append(deadline)
        suspended = {}
        for _ in range(100):  # 10 s at most
            await asyncio.sleep(0.1)
            suspended = stack.call("GET", f"/api/kernels/{kernel_id}").body
            if suspended["gpupool"]["state"] == "suspended":
                break
        seen_at = time.time()
        assert suspended["gpupool"]["state"] == "suspended", suspended
        # Promptly, not to the second: a timing bound under a loaded CI (2.4 s was seen there).
        assert seen_at - deadline < 5, "suspended within seconds of the deadline"
        stack.wait_for(lambda: free_h100(stack) == free_before, 3, "the GPU to go back to the pool")
        assert len(checkpoint_files(stack) - files_before) == 1
        await asyncio.sleep(1.0)  # suspended for a while: none of it may be billed
        # The same websocket, still open: the next cell resumes the kernel and runs.
        out, err = await run(sock, "print(x + 1)")
        sock.close()
        return suspended, out, err, stack.call("GET", f"/api/kernels/{kernel_id}").body

    suspended, out, err, after = asyncio.run(scenario())
    assert suspended["execution_state"] == "idle" and suspended["gpupool"]["idle_deadline"] is None
    first, second = stack.call("GET", f"/api/usage?kernel={kernel_id}").body["intervals"]
    assert first["end_reason"] == "suspended" and second["end"] is None
    # Billing ended within a second of the idle deadline, and nothing while suspended.
    assert 0 <= stamp(first["end"]) - deadline_seen[0] < 1.0, (first, deadline_seen)
    assert stamp(second["start"]) - stamp(first["end"]) >= 0.9  # the test waited suspended
    billed = first["seconds"] + second["seconds"]
    held = stamp(first["end"]) - stamp(first["start"]) + time.time() - stamp(second["start"])
    assert abs(billed - held) < 0.5
    assert "not saved: gen" in suspended["gpupool"]["reason"]
    assert out == "42\n"
    assert "these variables were lost: gen (cannot pickle 'generator' object)" in err
    assert after["id"] == kernel_id and after["gpupool"]["state"] == "running"
    # Restored: its checkpoint is deleted (the next suspend writes a new one).
    stack.wait_for(lambda: checkpoint_files(stack) == files_before, 5, "the checkpoint to go")
    stack.call("DELETE", f"/api/kernels/{kernel_id}")


def suspended_with_x(stack) -> str:
    """A GPU kernel with x = 1 in it, suspended for being idle (its checkpoint written)."""
    kernel_id = str(stack.create(name="python3-gpu-h100-x1", env=IDLE)["id"])
    asyncio.run(run_code(stack.url, stack.token, kernel_id, "x = 1"))
    stack.wait_for(
        lambda: (
            stack.call("GET", f"/api/kernels/{kernel_id}").body["gpupool"]["state"] == "suspended"
        ),
        10,
        "the kernel to be suspended",
    )
    return kernel_id


def test_shutting_down_a_suspended_kernel_deletes_its_checkpoint(stack):
    files_before = checkpoint_files(stack)
    kernel_id = suspended_with_x(stack)
    assert len(checkpoint_files(stack) - files_before) == 1
    assert stack.call("DELETE", f"/api/kernels/{kernel_id}").status == 204
    assert checkpoint_files(stack) == files_before


def test_a_suspended_kernel_restarted_comes_back_empty(stack):
    """Restart of a suspended kernel (Lab's Restart while it slept) is a fresh namespace, as for
    a running one: its checkpoint is deleted, and the next cell resumes it without x. It was a
    no-op that succeeded, and the next cell brought the old variables back."""
    files_before = checkpoint_files(stack)
    kernel_id = suspended_with_x(stack)
    assert len(checkpoint_files(stack) - files_before) == 1
    assert stack.call("POST", f"/api/kernels/{kernel_id}/restart").status == 200
    assert checkpoint_files(stack) == files_before
    code = "print('x' in globals())"
    assert asyncio.run(run_code(stack.url, stack.token, kernel_id, code)) == "False\n"
    assert stack.call("DELETE", f"/api/kernels/{kernel_id}").status == 204


@pytest.mark.parametrize("protocol", [None, V1])
def test_a_reconnecting_tab_does_not_resume_a_suspended_kernel(stack, protocol):
    """A tab that reconnects asks kernel_info first: the gateway answers it from the reply the
    kernel gave at its checkpoint, and the kernel stays suspended (no GPU held, nothing billed).
    The next cell resumes it, with its variables."""
    kernel_id = suspended_with_x(stack)
    billed = stack.call("GET", f"/api/kernels/{kernel_id}").body["gpupool"]["billed_seconds"]

    async def reconnect_then_run() -> tuple[list[dict], str]:
        sock = await KernelSocket.open(stack.url, stack.token, kernel_id, protocol)
        try:
            msg_id = await sock.send("shell", "kernel_info_request", {})
            answered = [await sock.recv(10) for _ in range(3)]
            assert all(m["parent_header"]["msg_id"] == msg_id for m in answered)
            await asyncio.sleep(1.0)  # time for a resume to show, were one started
            model = stack.call("GET", f"/api/kernels/{kernel_id}").body
            assert model["gpupool"]["state"] == "suspended", model["gpupool"]
            out, _ = await run(sock, "print(x)")
        finally:
            sock.close()
        return answered, out

    answered, out = asyncio.run(reconnect_then_run())
    assert [(m["channel"], m["msg_type"]) for m in answered] == [
        ("iopub", "status"),
        ("shell", "kernel_info_reply"),
        ("iopub", "status"),
    ]
    reply = answered[1]["content"]
    assert reply["status"] == "ok" and reply["language_info"]["name"] == "python"
    assert reply["implementation"] == "ipython"
    assert [m["content"]["execution_state"] for m in (answered[0], answered[2])] == ["busy", "idle"]
    assert out == "1\n"  # the cell resumed it, with x
    model = stack.call("GET", f"/api/kernels/{kernel_id}").body["gpupool"]
    assert model["billed_seconds"] >= billed
    assert stack.call("DELETE", f"/api/kernels/{kernel_id}").status == 204


def test_a_busy_kernel_is_never_suspended_mid_cell(stack):
    kernel_id = stack.create(name="python3-gpu-h100-x1", env=IDLE)["id"]

    async def long_cell() -> list[str]:
        sock = await KernelSocket.open(stack.url, stack.token, kernel_id)
        states = []
        task = asyncio.ensure_future(run(sock, "import time; time.sleep(10); print('done')"))
        while not task.done():
            await asyncio.sleep(0.5)
            states.append(stack.call("GET", f"/api/kernels/{kernel_id}").body["gpupool"]["state"])
        out, _ = await task
        sock.close()
        assert out == "done\n"
        return states

    states = asyncio.run(long_cell())
    assert set(states) == {"running"}, states
    stack.call("DELETE", f"/api/kernels/{kernel_id}")


def test_idle_timeout_bounds(stack):
    reply = stack.call(
        "POST", "/api/kernels", {"name": "python3", "env": {"KERNEL_IDLE_TIMEOUT": "0.5"}}
    )
    assert reply.status == 400 and "may use 1 to 604800 seconds" in reply.body["message"]
    reply = stack.call(
        "POST", "/api/kernels", {"name": "python3", "env": {"KERNEL_IDLE_TIMEOUT": "soon"}}
    )
    assert reply.status == 400 and "KERNEL_IDLE_TIMEOUT is 'soon'" in reply.body["message"]
    token = stack.tenant("bounded", idle_min=60, idle_max=120)
    too_long = stack.call(
        "POST",
        "/api/kernels",
        {"name": "python3", "env": {"KERNEL_IDLE_TIMEOUT": "600"}},
        token=token,
    )
    assert (
        too_long.status == 400
        and "tenant bounded may use 60 to 120 seconds" in too_long.body["message"]
    )
    ok = stack.call("POST", "/api/kernels", {"name": "python3"}, token=token)
    assert ok.status == 201 and ok.body["gpupool"]["idle_timeout"] == 120.0  # the default, capped
    stack.call("DELETE", f"/api/kernels/{ok.body['id']}", token=token)
    inverted = {"name": "inverted", "idle_min": 50, "idle_max": 10}
    bad = stack.call("POST", "/api/admin/tenants", inverted, token=stack.admin_token)
    assert bad.status == 400 and "above idle_max" in bad.body["message"]


def test_idle_action_cull_shuts_the_kernel_down(tmp_path):
    gateway = start_gateway(tmp_path, "--idle-action", "cull", "--idle-timeout", "2")
    join = f"--join-token={gateway.join_token}"
    host = start_host(tmp_path, "--fake-gpus", "H100:1", "--no-isolate", "--gateway", gateway.url,
                      join, "--heartbeat-seconds", "0.5")  # fmt: skip
    try:
        gateway.token = gateway.tenant("culled")
        gateway.wait_for(lambda: gateway.call("GET", "/api/gpus").body, 20, "the host to join")
        kernel_id = gateway.create(name="python3-gpu-h100-x1")["id"]
        model = gateway.wait_for(
            lambda: (m := gateway.call("GET", f"/api/kernels/{kernel_id}").body)["gpupool"]["state"]
            == "dead" and m, 30, "the idle kernel to be culled",  # 10 s was short beside 64 starts
        )  # fmt: skip
        assert "culled after being idle for 2 s" in model["gpupool"]["reason"]
        [interval] = gateway.call("GET", f"/api/usage?kernel={kernel_id}").body["intervals"]
        assert interval["end"] is not None
        assert kernel_id not in {k["id"] for k in gateway.call("GET", "/api/kernels").body}
    finally:
        host.stop()
        gateway.stop()
