"""Two tenants' kernels on the embedded stack (`gpupool up`, run as root, isolating by default):
tenant b's kernel tries everything it can on tenant a's kernel and on the stack's secrets, and
gets nothing. It runs wherever the tests run as root (CI does); elsewhere it skips, since only
root can run kernels as other users.

The stack's folder is made passable by everyone (0711) here, so that only the state folder's own
mode, not a private folder above it, is what keeps b out."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, start_stack
from kernel_ws import run_code
from sqlalchemy import select

from kernel_gateway.store import Host, open_store
from kernel_gateway.tokens import host_token
from kernel_gateway.up import host_state_dir

if sys.platform != "linux" or os.geteuid() != 0:
    pytest.skip("kernels run as their tenants' users only under root", allow_module_level=True)
if shutil.which("useradd") is None:
    pytest.skip("tenants' users are made with useradd, which is missing", allow_module_level=True)

# The first run on a machine may build the kernel venv (/opt/gpupool/kernel-venv).
pytestmark = pytest.mark.timeout(600)
GPU_KERNEL = "python3-gpu-h100-x1"

SELF = r"""
import ipykernel, json, os, pwd, sys
cf = ipykernel.get_connection_file()
open("a-secret.txt", "w").write("only for a")
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid(),
                  "user": pwd.getpwuid(os.getuid()).pw_name, "cwd": os.getcwd(),
                  "python": sys.executable,
                  "connection_file": cf, "connection": json.load(open(cf))}))
"""

ATTACK = r"""
import json, os, socket
from jupyter_client import BlockingKernelClient
A = VICTIM

def attempt(action):
    try:
        action()
        return "allowed"
    except PermissionError:
        return "PermissionError"
    except Exception as error:
        return type(error).__name__

def read(path):
    with open(path, "rb") as f:
        f.read(1)

def connect(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)

def ask_kernel_info():
    # A's own connection info, key included, as if b had got hold of it somehow.
    client = BlockingKernelClient()
    client.load_connection_info(A["connection"])
    client.start_channels()
    try:
        client.kernel_info(reply=True, timeout=3)
    finally:
        client.stop_channels()

shell = "%s-%s" % (A["connection"]["ip"], A["connection"]["shell_port"])
found = {
    "read a's file": attempt(lambda: read(os.path.join(A["cwd"], "a-secret.txt"))),
    "list a's folder": attempt(lambda: os.listdir(A["cwd"])),
    "read a's connection file": attempt(lambda: read(A["connection_file"])),
    "signal a's kernel": attempt(lambda: os.kill(A["pid"], 0)),
    "read a's kernel's environment": attempt(lambda: read("/proc/%d/environ" % A["pid"])),
    "read the host's environment": attempt(lambda: read("/proc/%d/environ" % A["ppid"])),
    "connect to a's shell socket": attempt(lambda: connect(shell)),
    "run code in a's kernel with a's key": attempt(ask_kernel_info),
}
for name in STATE_FILES:
    found["read " + name] = attempt(lambda: read(os.path.join(STATE, name)))
found["list the state folder"] = attempt(lambda: os.listdir(STATE))
cmdlines = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmdlines.append(open("/proc/%s/cmdline" % pid, "rb").read().decode(errors="replace"))
    except OSError:
        pass
print(json.dumps({"attempts": found, "cmdlines": cmdlines}))
"""
STATE_FILES = ("admin-token", "join-token", "host-key", "gateway.db", "gateway.db-wal",
               "host.log")  # fmt: skip


@pytest.fixture(scope="module")
def stack() -> Iterator[Gateway]:
    base = Path(tempfile.mkdtemp(prefix="gpupool-isolation-root-"))
    base.chmod(0o711)
    gateway = start_stack(base, "H100:2")
    try:
        yield gateway
    finally:
        gateway.stop()
        shutil.rmtree(host_state_dir(gateway.state_dir.resolve()), ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def start_kernel(stack: Gateway, token: str) -> str:
    reply = stack.call("POST", "/api/kernels", {"name": GPU_KERNEL}, token=token)
    assert reply.status == 201, reply.body
    return str(reply.body["id"])


@pytest.fixture(scope="module")
def tenants(stack: Gateway) -> dict[str, Any]:
    """a's and b's tokens, kernels, and what a's kernel says about itself."""
    tokens = {name: stack.tenant(f"root-{name}") for name in ("a", "b")}
    kernels = {name: start_kernel(stack, token) for name, token in tokens.items()}
    a = json.loads(asyncio.run(run_code(stack.url, tokens["a"], kernels["a"], SELF)))
    return {"tokens": tokens, "kernels": kernels, "a": a}


@pytest.fixture(scope="module")
def attack(stack: Gateway, tenants: dict[str, Any]) -> dict[str, Any]:
    code = (
        ATTACK.replace("VICTIM", repr(tenants["a"]))
        .replace("STATE_FILES", repr(STATE_FILES))
        .replace("STATE", repr(str(stack.state_dir)))
    )
    out = asyncio.run(run_code(stack.url, tenants["tokens"]["b"], tenants["kernels"]["b"], code))
    return dict(json.loads(out))


def secrets_of(stack: Gateway, tenants: dict[str, Any]) -> dict[str, str]:
    """Every secret of the stack: tokens, keys, and each host's token, derived as the gateway
    derives it."""
    state = stack.state_dir
    found = {
        name: (state / name).read_text().strip()
        for name in STATE_FILES[:3]
        if (state / name).exists()
    }
    found.update({f"tenant {k}": v for k, v in tenants["tokens"].items()}, demo=stack.token)
    with open_store(str(state / "gateway.db"))() as s:
        for host in s.scalars(select(Host)).all():
            found[f"host {host.name}"] = host_token(
                found.get("host-key", ""), getattr(host, "token_salt", "") or ""
            )
    return found


def test_a_kernel_runs_as_its_own_tenant(tenants: dict[str, Any]) -> None:
    a = tenants["a"]
    assert a["uid"] != 0 and a["user"] == "gp-root-a", a
    assert a["python"] == "/opt/gpupool/kernel-venv/bin/python", a  # the venv tenants can run


def test_a_tenants_kernel_has_gpu_magic_loaded(stack: Gateway, tenants: dict[str, Any]) -> None:
    """The tenants' kernel venv holds every package `%%gpu` imports (jupyter_ext and gpupool):
    a missing one left the extension unloaded with only a warning in the host's log."""
    code = "print('jupyter_ext' in get_ipython().extension_manager.loaded)"
    token, kernel = tenants["tokens"]["a"], tenants["kernels"]["a"]
    assert asyncio.run(run_code(stack.url, token, kernel, code)) == "True\n"
    # Their bytecode is there too: the tenant's user cannot write it, and every kernel would
    # compile them again at start.
    code = ("import os, gpupool.wire, jupyter_ext.magics as m\n"
            "print(all(os.path.exists(x.__cached__) for x in (gpupool.wire, m)))")  # fmt: skip
    assert asyncio.run(run_code(stack.url, token, kernel, code)) == "True\n"


def test_b_can_reach_nothing_of_a_nor_of_the_stack(attack: dict[str, Any]) -> None:
    refused = {what: result for what, result in attack["attempts"].items()}
    allowed = {what: result for what, result in refused.items() if result == "allowed"}
    assert not allowed, refused
    # Run with a's key, b's client gets no answer at all: it cannot even reach the socket.
    assert refused["run code in a's kernel with a's key"] in ("TimeoutError", "RuntimeError")
    assert refused["signal a's kernel"] == "PermissionError"
    assert refused["read a's connection file"] == "PermissionError"


def test_no_secret_on_any_command_line(
    stack: Gateway, tenants: dict[str, Any], attack: dict[str, Any]
) -> None:
    assert len(attack["cmdlines"]) > 5  # b can see other processes' command lines, as any user
    leaks = {
        name: line[:200]
        for name, secret in secrets_of(stack, tenants).items()
        for line in attack["cmdlines"]
        if secret and secret in line
    }
    assert not leaks, leaks


def test_state_folder_and_logs_are_roots_alone(stack: Gateway) -> None:
    state = stack.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.iterdir():
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0, path


def test_no_secret_in_the_logs(stack: Gateway, tenants: dict[str, Any]) -> None:
    logs = (stack.state_dir / "host.log").read_text() + stack.log_path.read_text()
    leaked = [name for name, secret in secrets_of(stack, tenants).items()
              if name != "demo" and secret and secret in logs]  # fmt: skip
    assert not leaked, leaked  # `gpupool up` prints the demo tenant's token, on purpose
    # Nor the host's own token (which only the host knows), nor any 64-hex-digit token.
    assert not re.findall(r"\b[0-9a-f]{64}\b", (stack.state_dir / "host.log").read_text())
