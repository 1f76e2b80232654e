"""A kernel's life on the host: one that dies is reported dead and never silently restarted, a
restart keeps the environment it was started with, a resume goes on counting cells, and
`gpupool host --help` works."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

from kernel_ws import KernelSocket, run_code

PID = "import os; print(os.getpid())"


def pid_of(agent: Any, kernel_id: str) -> int:
    return int(asyncio.run(run_code(agent.url, agent.token, kernel_id, PID)))


def state(agent: Any, kernel_id: str) -> str:
    return str(agent.call("GET", f"/api/kernels/{kernel_id}").body["execution_state"])


def test_a_killed_kernel_is_reported_dead_and_never_restarted(host_factory):
    """jupyter_client's restarter (every 3 s) used to bring a killed kernel back, empty, under
    the same id, before the host's death watch saw it. The watch polls every 6 s here, so that
    without the fix the restarter wins nearly every time; 10 kills in two rounds of 5."""
    agent = host_factory(
        "--fake-gpus", "H100:1", "--no-isolate", "--warm-per-shape", "0",
        "--HostKernelManager.poll_seconds=6",
    )  # fmt: skip
    for _ in range(2):
        kernels = [agent.create(name="python3")["id"] for _ in range(5)]
        pids = {kernel_id: pid_of(agent, kernel_id) for kernel_id in kernels}
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        for kernel_id in kernels:
            agent.wait_for(
                lambda k=kernel_id: state(agent, k) == "dead", 20, f"kernel {kernel_id} dead"
            )
        reported = {k["id"]: k for k in agent.call("GET", "/api/host").body["kernels"]}
        for kernel_id in kernels:
            assert reported[kernel_id]["execution_state"] == "dead"  # what heartbeats carry
            assert "SIGKILL" in reported[kernel_id]["reason"]
            assert agent.call("POST", f"/api/kernels/{kernel_id}/interrupt").status == 404
            agent.call("DELETE", f"/api/kernels/{kernel_id}")
    assert "restarting kernel" not in agent.log_path.read_text()


def test_a_restart_keeps_the_env_of_a_kernel_taken_warm(host):
    host.wait_for(lambda: host.warm_count() >= 3, 60, "warm kernels")
    env = {"GPUPOOL_URL": "http://gw.example:8888", "GPUPOOL_TOKEN": "t0k3n", "MINE": "mine"}
    model = host.create(gpu_type="H100", tenant="envy", env=env)
    assert model["gpupool"]["start"] == "warm"
    kernel_id = model["id"]
    code = "import os; print(*(os.environ.get(k) for k in ('GPUPOOL_URL', 'GPUPOOL_TOKEN', "
    code += "'MINE', 'GPUPOOL_TENANT', 'CUDA_VISIBLE_DEVICES')))"
    before = asyncio.run(run_code(host.url, host.token, kernel_id, code))
    assert before.split()[:4] == ["http://gw.example:8888", "t0k3n", "mine", "envy"], before
    reply = host.call("POST", f"/api/kernels/{kernel_id}/restart")
    assert reply.status == 200, reply.body
    after = asyncio.run(run_code(host.url, host.token, kernel_id, code))
    assert after == before
    host.call("DELETE", f"/api/kernels/{kernel_id}")


async def cell(sock: KernelSocket, code: str) -> int:
    """Run `code` as a notebook cell (stored in history); its execution count."""
    msg_id = await sock.send("shell", "execute_request", {"code": code, "silent": False,
                                                          "store_history": True})  # fmt: skip
    while True:
        msg = await sock.recv(60)
        if msg["msg_type"] == "execute_reply" and msg["parent_header"]["msg_id"] == msg_id:
            return int(msg["content"]["execution_count"])


def test_a_resumed_kernel_goes_on_counting_cells(host):
    first = host.create(name="python3")["id"]
    second = host.create(name="python3")["id"]

    async def cells(kernel_id: str, codes: list[str]) -> list[int]:
        sock = await KernelSocket.open(host.url, host.token, kernel_id)
        try:
            return [await cell(sock, code) for code in codes]
        finally:
            sock.close()

    assert asyncio.run(cells(first, ["a = 1", "b = 2", "c = a + b"])) == [1, 2, 3]
    saved = host.call("POST", f"/api/kernels/{first}/checkpoint")
    assert saved.status == 200, saved.body
    restored = host.call("POST", f"/api/kernels/{second}/restore", {"path": saved.body["path"]})
    assert restored.status == 200, restored.body
    assert asyncio.run(cells(second, ["print(c)", "d = c"])) == [4, 5]
    for kernel_id in (first, second):
        host.call("DELETE", f"/api/kernels/{kernel_id}")


def test_host_help_and_help_all():
    """--help-all used to end in a KeyError traceback: an option named a class it did not list."""
    outputs = {}
    for name, command in (
        ("help", [sys.executable, "-m", "gpu_host", "--help"]),
        ("help-all", [sys.executable, "-m", "gpu_host", "--help-all"]),
        ("gpupool host", [sys.executable, "-m", "gpupool.cli", "host", "--help"]),
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "--max-message-mb" in done.stdout and "gpupool host --fake-gpus" in done.stdout
        outputs[name] = done.stdout
    assert "--HostKernelManager.max_websockets_per_kernel" in outputs["help-all"]
    assert "jupyter server password" not in outputs["help"]  # not jupyter_server's own examples
