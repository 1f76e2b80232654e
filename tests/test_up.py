"""`gpupool up` with JupyterLab: what it prints, Lab in front of the gateway, a tenant made with
`gpupool tenant create` beside it, and Ctrl-C ending every process it started, kernels included."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import HostAgent, Reply, _read_lines, free_port
from kernel_ws import run_code

from kernel_gateway.store import Kernel, open_store
from kernel_gateway.up import host_state_dir

pytestmark = pytest.mark.slow


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process (zombies left out)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), cmdline)
    return table


def descendants(pid: int) -> dict[int, str]:
    table = process_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, cmdline) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmdline
                frontier.append(child)
    return found


@dataclass
class Client:
    url: str
    token: str

    call = HostAgent.call


def get(url: str, token: str) -> Reply:
    return Client(url, token).call("GET", "")


@pytest.mark.parametrize(("ctrl_c", "mode"), [("process", "hybrid"), ("group", "gateway")])
def test_up_with_lab_then_ctrl_c(tmp_path: Path, ctrl_c: str, mode: str) -> None:
    """`process`: SIGINT to `gpupool up` alone (as from `kill -INT`). `group`: to its whole process
    group, as a terminal's Ctrl-C does, so every child gets it at the same moment. `mode`: Lab
    with local and pool kernels side by side (the default), or stock Lab in gateway mode."""
    log_path = tmp_path / "up.log"
    command = [sys.executable, "-m", "gpupool.cli", "up", "--port", str(free_port()),
               "--host-port", str(free_port()), "--lab-port", str(free_port()),
               "--fake-gpus", "H100:2", "--lab-mode", mode]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "data")  # the Lab's kernelspecs: not the user's
    log = open(log_path, "w")  # the process writes it until it ends
    proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env=env, cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    try:
        lines = _read_lines(proc, log_path, ("lab", "gateway", "token"))
        lab_url, gateway_url, token = lines["lab"], lines["gateway"], lines["token"]
        assert "/lab?token=" in lab_url, lab_url
        lab_base, lab_token = lab_url.split("/lab?token=")

        # Lab serves the pool's kernelspecs, through the gateway, to a browser with Lab's token.
        specs = get(f"{lab_base}/api/kernelspecs", lab_token)
        assert specs.status == 200, specs.body
        assert "python3-gpu-h100-x1" in specs.body["kernelspecs"]
        assert specs.body["kernelspecs"]["python3-gpu-h100-x1"]["spec"]["metadata"]["gpupool"]
        local = specs.body["kernelspecs"]["python3"]["spec"]
        if mode == "hybrid":  # the user's own python3 beside the pool's shapes
            assert "kernel_provisioner" not in local.get("metadata", {}), local
            assert (tmp_path / ".gpupool" / "jupyter" / "kernels" / "python3-gpu-h100-x1").is_dir()
        else:  # every kernel is the pool's, its CPU one included
            assert local["metadata"]["gpupool"], local
        assert get(f"{gateway_url}/api/kernelspecs", token).status == 200

        # A GPU kernel started through Lab as its browser does (a session) runs, pinned.
        reply = Client(lab_base, lab_token).call(
            "POST", "/api/sessions",
            {"path": "gpu.ipynb", "type": "notebook", "kernel": {"name": "python3-gpu-h100-x1"}},
        )  # fmt: skip
        assert reply.status == 201, (reply.body, log_path.read_text())
        pin = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
        out = asyncio.run(run_code(lab_base, lab_token, reply.body["kernel"]["id"], pin))
        assert out.startswith("GPU-"), out

        # `gpupool tenant create` in the same folder: a token alone on its last line, good at once.
        made = subprocess.run(
            [sys.executable, "-m", "gpupool.cli", "tenant", "create", "alice"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        alice = made.stdout.strip().splitlines()[-1]
        assert alice and " " not in alice and len(alice) >= 43, made.stdout
        assert get(f"{gateway_url}/api/kernelspecs", alice).status == 200
        assert get(f"{gateway_url}/api/kernels", alice).body == []  # alice sees only her own
        state = tmp_path / ".gpupool"  # `gpupool up`'s default, beside the user's notebooks
        assert (state / "gateway.db").exists()
        again = subprocess.run(
            [sys.executable, "-m", "gpupool.cli", "tenant", "--state-dir", str(state),
             "token", "alice"],
            cwd="/", env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        second = again.stdout.strip().splitlines()[-1]
        assert second != alice and get(f"{gateway_url}/api/kernelspecs", second).status == 200

        tree = descendants(proc.pid)
        kernels = {pid for pid, cmd in tree.items() if "ipykernel_launcher" in cmd}
        assert kernels, tree  # the kernel above, and the host's warm pool
        assert any("gpu_host" in cmd for cmd in tree.values()), tree
        assert any("jupyterlab" in cmd for cmd in tree.values()), tree
        host_pid = next(pid for pid, cmd in tree.items() if "-m gpu_host" in cmd)
        runtime = os.path.join(tempfile.gettempdir(), f"gpupool-{os.getuid()}-{host_pid}")

        began = time.monotonic()
        if ctrl_c == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        proc.wait(30)
        deadline = began + 30
        while time.monotonic() < deadline:
            table = process_table()
            left = {
                pid: table[pid][1] for pid in tree if pid in table and table[pid][1] == tree[pid]
            }
            left.update({pid: cmd for pid, (_, cmd) in table.items() if runtime in cmd})
            if not left:
                break
            time.sleep(0.2)
        assert not left, f"still running after Ctrl-C: {left}\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() - began < 30
        assert "gpupool up: stopped" in log_path.read_text()
        # Lab logged the environment of the kernel it started (its token and the tenant's
        # among it): the logs keep no secret (issue 10).
        for name in ("lab.log", "host.log"):
            text = (state / name).read_text()
            assert text and lab_token not in text and token not in text, name
        assert proc.returncode == 0, log_path.read_text()[-3000:]
        assert not os.path.exists(runtime)  # the host shut down and removed its runtime folder
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def start_up(folder: Path, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    """`gpupool up --no-lab` in `folder`, in its own process group (as from a terminal)."""
    log_path = folder / f"up-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpupool.cli", "up", "--no-lab", "--fake-gpus", "H100:2",
         *extra],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env=env, cwd=folder, start_new_session=True,
    )  # fmt: skip
    return proc, log_path


def test_up_on_a_busy_port_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, log_path = start_up(tmp_path, "--port", str(port))
        assert proc.wait(60) != 0
    out = log_path.read_text()
    assert "Traceback" not in out and f"port {port} of 127.0.0.1 is already in use" in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / ".gpupool").exists()


def test_up_with_host_port_0_registers_the_port_it_got(tmp_path: Path) -> None:
    proc, log_path = start_up(tmp_path, "--port", str(free_port()), "--host-port", "0")
    try:
        lines = _read_lines(proc, log_path, ("gateway", "token"))
        gateway = Client(lines["gateway"], lines["token"])
        admin = (tmp_path / ".gpupool" / "admin-token").read_text().strip()
        [host] = Client(lines["gateway"], admin).call("GET", "/api/hosts").body
        assert not host["url"].endswith(":0"), host
        reply = gateway.call("POST", "/api/kernels", {"name": "python3-gpu-h100-x1"})
        assert reply.status == 201, reply.body
        out = asyncio.run(run_code(gateway.url, gateway.token, reply.body["id"], "print(6 * 7)"))
        assert out.strip() == "42"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        shutil.rmtree(host_state_dir((tmp_path / ".gpupool").resolve()), ignore_errors=True)


def test_ctrl_c_shuts_kernels_down_through_the_gateway_before_the_host(tmp_path: Path) -> None:
    """The gateway deletes every kernel, a suspended one's checkpoint included, while the host
    still answers; only then does the host stop."""
    proc, log_path = start_up(tmp_path, "--port", str(free_port()))
    state = (tmp_path / ".gpupool").resolve()
    try:
        lines = _read_lines(proc, log_path, ("gateway", "token"))
        gateway = Client(lines["gateway"], lines["token"])
        ids = []
        for env in ({"KERNEL_IDLE_TIMEOUT": "1"}, {}):
            reply = gateway.call(
                "POST", "/api/kernels", {"name": "python3-gpu-h100-x1", "env": env}
            )
            assert reply.status == 201, reply.body
            ids.append(reply.body["id"])
            asyncio.run(run_code(gateway.url, gateway.token, ids[-1], "kept = list(range(10))"))
        deadline = time.monotonic() + 60
        while gateway.call("GET", f"/api/kernels/{ids[0]}").body["gpupool"]["state"] != "suspended":
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        with open_store(str(state / "gateway.db"))() as s:
            checkpoint = Path(s.get(Kernel, ids[0]).checkpoint["path"])
        assert checkpoint.exists()

        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
        out = log_path.read_text() + (state / "host.log").read_text()
        assert "unreachable while deleting" not in out, out[-3000:]
        assert not checkpoint.exists(), out[-3000:]
        with open_store(str(state / "gateway.db"))() as s:
            assert {s.get(Kernel, k).state for k in ids} == {"deleted"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(host_state_dir(state), ignore_errors=True)
