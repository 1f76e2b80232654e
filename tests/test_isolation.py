"""Tenant isolation on a host agent run as root with --isolate (DESIGN.md, "Security").

Two tenants, a and b, each get a kernel. Each runs as its own unprivileged user in a private
working folder, talks over IPC sockets in a private run folder, sees none of the agent's secrets,
and cannot read, list, signal, connect to or listen in on the other's files and kernel.

The kernels need a Python with ipykernel that unprivileged users can run (a Python under a private
folder such as /root cannot be), so the first run on a machine builds a venv of the system Python
with the same ipykernel as this one, cached under /var/tmp for later runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ipykernel
import pytest
import zmq
import zmq.asyncio
from conftest import HostAgent, start_host
from kernel_ws import run_code

from gpu_host.kernel_python import open_to_all

if sys.platform != "linux" or os.geteuid() != 0:
    pytest.skip(
        "tenant isolation needs the host agent to run as root on Linux", allow_module_level=True
    )
if shutil.which("useradd") is None:
    pytest.skip("tenant isolation needs useradd to create tenants' users", allow_module_level=True)

# Building the cached kernel venv the first time may take a minute.
pytestmark = pytest.mark.timeout(300)

NOBODY = 65534  # an unprivileged uid and gid, to check what any tenant's user could run
CACHE = Path("/var/tmp")
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
HOST_TOKEN = "host-" + secrets.token_urlsafe(24)
JOIN_TOKEN = "join-" + secrets.token_urlsafe(24)
SECRET_ENV = {"GPUPOOL_HOST_TOKEN": HOST_TOKEN, "GPUPOOL_JOIN_TOKEN": JOIN_TOKEN}


# -- a kernel Python that unprivileged users can run ------------------------------------------


def as_nobody(*command: str) -> subprocess.CompletedProcess[str] | None:
    """Run `command` as an unprivileged user; None when it cannot even be started."""
    try:
        return subprocess.run(
            command, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", capture_output=True,
            text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None


def system_python() -> tuple[str, str]:
    """A Python with venv and ensurepip that unprivileged users can run, and its version."""
    wanted = os.environ.get("GPUPOOL_TEST_SYSTEM_PYTHON")
    for python in (wanted,) if wanted else SYSTEM_PYTHONS:
        done = as_nobody(
            python, "-c", "import ensurepip, sys, venv; print('%d.%d' % sys.version_info[:2])"
        )
        if done is not None and done.returncode == 0:
            return python, done.stdout.strip()
    pytest.skip(
        f"no Python with venv and ensurepip that unprivileged users can run among "
        f"{', '.join((wanted,) if wanted else SYSTEM_PYTHONS)} (set GPUPOOL_TEST_SYSTEM_PYTHON)"
    )


def venv_works(venv: Path) -> bool:
    info = venv.lstat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022 or not stat.S_ISDIR(info.st_mode):
        pytest.fail(
            f"{venv} is not a folder that only root can write: it is not safe to run as root; "
            "remove it"
        )
    done = as_nobody(str(venv / "bin" / "python"), "-c", "import ipykernel, zmq")
    return done is not None and done.returncode == 0


def build_venv(python: str, venv: Path) -> None:
    """Build the venv in a private temporary folder and rename it into place when complete, so
    that concurrent runs never see half of one: the first rename wins, the others are dropped."""
    build = Path(tempfile.mkdtemp(prefix=f".{venv.name}-", dir=venv.parent))
    try:
        subprocess.run([python, "-m", "venv", str(build)], check=True, capture_output=True)
        pip = subprocess.run(
            [str(build / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", f"ipykernel=={ipykernel.__version__}"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if pip.returncode != 0:
            lines = (pip.stderr or pip.stdout).strip().splitlines() or ["no output"]
            pytest.skip(
                f"could not pip install ipykernel=={ipykernel.__version__} for {python}: "
                f"{lines[-1]}"
            )
        open_to_all(build)
        try:
            os.rename(build, venv)
        except OSError:
            if not venv.is_dir():
                raise  # not another run's venv in the way: a real failure
    finally:
        shutil.rmtree(build, ignore_errors=True)


@pytest.fixture(scope="session")
def kernel_python() -> str:
    """The cached venv's Python, built on first use."""
    python, version = system_python()
    venv = CACHE / f"gpupool-test-kernel-python-{ipykernel.__version__}-py{version}"
    if venv.exists() and not venv_works(venv):
        stale = venv.with_name(f".{venv.name}-stale-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):  # another run may have moved it first
            os.rename(venv, stale)
        shutil.rmtree(stale, ignore_errors=True)
    if not venv.exists():
        build_venv(python, venv)
    if not venv_works(venv):
        pytest.fail(f"{venv}/bin/python cannot import ipykernel as an unprivileged user")
    return str(venv / "bin" / "python")


# -- agents and kernels -------------------------------------------------------------------------


@contextlib.contextmanager
def isolated_agent(python: str, reachable: bool = True) -> Iterator[HostAgent]:
    """An agent with --isolate whose tenants' folders are under a fresh folder in /tmp, which
    tenants may pass through when `reachable` (else it stays private to root)."""
    base = Path(tempfile.mkdtemp(prefix="gpupool-isolation-"))
    try:
        agent = start_host(base, "--fake-gpus", "H100:2", "--isolate", "--kernel-python", python,
                           "--warm-per-shape", "0", env=SECRET_ENV)  # fmt: skip
        try:
            agent.log_path.chmod(0o600)
            if reachable:
                base.chmod(0o711)
            yield agent
        finally:
            agent.stop()
            # The agent leaves its run folder (tenants' connection files and sockets) behind.
            runtime = Path(tempfile.gettempdir()) / f"gpupool-{os.getuid()}-{agent.proc.pid}"
            shutil.rmtree(runtime, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(agent: HostAgent, kernel_id: str, code: str) -> str:
    return asyncio.run(run_code(agent.url, agent.token, kernel_id, code))


IDENTITY = r"""
import json, os, pwd, stat, ipykernel
cf = ipykernel.get_connection_file()
cf_stat, wd_stat = os.stat(cf), os.stat(os.getcwd())
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "user": pwd.getpwuid(os.getuid()).pw_name, "pid": os.getpid(), "ppid": os.getppid(),
    "cwd": os.getcwd(), "home": os.environ.get("HOME"),
    "cwd_mode": stat.S_IMODE(wd_stat.st_mode), "cwd_uid": wd_stat.st_uid,
    "connection_file": cf, "cf_mode": stat.S_IMODE(cf_stat.st_mode), "cf_uid": cf_stat.st_uid,
    "connection": json.load(open(cf)), "env": dict(os.environ),
}))
open("secret.txt", "w").write("only for " + os.environ["USER"])
"""


@pytest.fixture(scope="module")
def agent(kernel_python: str) -> Iterator[HostAgent]:
    with isolated_agent(kernel_python) as agent:
        yield agent


@pytest.fixture(scope="module")
def kernels(agent: HostAgent) -> dict[str, dict[str, Any]]:
    """Tenant -> what its kernel reports about itself (see IDENTITY), plus its model."""
    found = {}
    for tenant in ("a", "b"):
        model = agent.create(tenant=tenant, gpu_type="H100", gpu_count=1)
        assert model["gpupool"]["tenant"] == tenant
        info = json.loads(run(agent, model["id"], IDENTITY))
        found[tenant] = {**info, "id": model["id"], "model": model}
    return found


def endpoint(info: dict[str, Any], channel: str) -> str:
    """The path of a kernel's IPC socket for `channel` (as jupyter_client names it)."""
    connection = info["connection"]
    return f"{connection['ip']}-{connection[channel + '_port']}"


# -- each kernel in its own space -----------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["a", "b"])
def test_kernel_runs_as_its_tenant_in_a_private_folder(
    kernels: dict[str, dict[str, Any]], tenant: str
) -> None:
    info = kernels[tenant]
    assert info["user"] == f"gp-{tenant}"
    assert info["uid"] == info["euid"] != 0
    assert info["gid"] != 0 and 0 not in info["groups"]
    assert set(info["groups"]) <= {info["gid"]}
    assert info["cwd"] == info["home"]
    assert Path(info["cwd"]).parts[-2:] == ("homes", tenant)
    assert (info["cwd_mode"], info["cwd_uid"]) == (0o700, info["uid"])
    assert info["env"]["USER"] == f"gp-{tenant}"


def test_tenants_have_distinct_users_and_gpus(kernels: dict[str, dict[str, Any]]) -> None:
    a, b = kernels["a"], kernels["b"]
    assert a["uid"] != b["uid"] and a["gid"] != b["gid"]
    assert a["model"]["gpupool"]["gpus"] != b["model"]["gpupool"]["gpus"]
    assert a["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(a["model"]["gpupool"]["gpus"])


@pytest.mark.parametrize("tenant", ["a", "b"])
def test_connection_file_is_private_and_uses_ipc(
    kernels: dict[str, dict[str, Any]], tenant: str
) -> None:
    info = kernels[tenant]
    assert (info["cf_mode"], info["cf_uid"]) == (0o600, info["uid"])
    assert info["connection"]["transport"] == "ipc"
    run_dir = Path(info["connection_file"]).parent
    assert run_dir.name == tenant
    assert Path(info["connection"]["ip"]).parent == run_dir  # the sockets live there too
    folder = run_dir.stat()  # jupyter_client adds the sticky bit, harmless here
    assert (folder.st_mode & 0o777, folder.st_uid) == (0o700, info["uid"])
    for channel in ("shell", "iopub", "stdin", "control", "hb"):
        assert stat.S_ISSOCK(os.stat(endpoint(info, channel)).st_mode)


LISTENING = r"""
import json, os, socket
from ipykernel.kernelapp import IPKernelApp

def listening_tcp():
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in open(table).read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports), len(inodes)

probe = socket.socket()
probe.bind(("127.0.0.1", 0))
probe.listen()
with_probe, _ = listening_tcp()
probe_port = probe.getsockname()[1]
probe.close()
listening, sockets = listening_tcp()
print(json.dumps({
    "with_probe": with_probe, "probe": probe_port, "listening": listening, "sockets": sockets,
    "iopub_pipe": getattr(IPKernelApp.instance().iopub_thread, "_pipe_port", None),
}))
"""


@pytest.mark.parametrize("tenant", ["a", "b"])
def test_kernel_listens_on_tcp_only_for_ipykernels_iopub_pipe(
    agent: HostAgent, kernels: dict[str, dict[str, Any]], tenant: str
) -> None:
    """The kernel's channels are all Unix sockets. ipykernel itself, though, always listens on
    one port of 127.0.0.1: the IOPub pipe through which forked subprocesses send their output
    (ipykernel/iostream.py, IOPubThread._setup_pipe_in). It only receives (a zmq PULL socket),
    and drops any message that does not start with a random 16-byte key, so nobody can listen to
    the kernel there; but a port scan finds it."""
    found = json.loads(run(agent, kernels[tenant]["id"], LISTENING))
    assert sorted([*found["listening"], found["probe"]]) == found["with_probe"]  # sees listeners
    assert found["sockets"] > 0
    assert found["listening"] == [found["iopub_pipe"]]


@pytest.mark.xfail(
    strict=True,
    reason="ipykernel binds its IOPub subprocess pipe to a TCP port of 127.0.0.1; rebinding it to "
    "an IPC socket in the tenant's run folder needs a patched launcher",
)
def test_kernel_listens_on_no_tcp_port(
    agent: HostAgent, kernels: dict[str, dict[str, Any]]
) -> None:
    found = json.loads(run(agent, kernels["b"]["id"], LISTENING))
    assert found["listening"] == []


@pytest.mark.parametrize("tenant", ["a", "b"])
def test_kernel_sees_none_of_the_agents_secrets(
    agent: HostAgent, kernels: dict[str, dict[str, Any]], tenant: str
) -> None:
    env = kernels[tenant]["env"]
    assert not [k for k in env if k.startswith(("GPUPOOL_HOST_", "GPUPOOL_JOIN_"))]
    assert HOST_TOKEN not in json.dumps(env) and JOIN_TOKEN not in json.dumps(env)
    # Nor can it read them from the agent (its parent, running as root).
    code = (
        "try:\n"
        f"    open('/proc/{kernels[tenant]['ppid']}/environ', 'rb').read()\n"
        "    print('read')\n"
        "except PermissionError:\n"
        "    print('PermissionError')\n"
    )
    assert run(agent, kernels[tenant]["id"], code).strip() == "PermissionError"
    assert kernels[tenant]["ppid"] == agent.proc.pid


# -- one tenant against the other -------------------------------------------------------------

ATTEMPTS = r"""
import json, os, socket
V = VICTIM

def attempt(action):
    try:
        action()
        return "allowed"
    except PermissionError:
        return "PermissionError"
    except Exception as error:
        return repr(error)

def connect(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)

secret = os.path.join(V["cwd"], "secret.txt")
run_dir = os.path.dirname(V["connection_file"])
print(json.dumps({
    "read a file in its folder": attempt(lambda: open(secret).read()),
    "stat a file in its folder": attempt(lambda: os.stat(secret)),
    "list its folder": attempt(lambda: os.listdir(V["cwd"])),
    "write in its folder": attempt(lambda: open(os.path.join(V["cwd"], "planted"), "w").close()),
    "signal its kernel": attempt(lambda: os.kill(V["pid"], 0)),
    "read its kernel's environment": attempt(lambda: open(f"/proc/{V['pid']}/environ").read()),
    "read its connection file": attempt(lambda: open(V["connection_file"]).read()),
    "list its run folder": attempt(lambda: os.listdir(run_dir)),
    "stat its iopub socket": attempt(lambda: os.stat(V["iopub"])),
    "connect to its shell socket": attempt(lambda: connect(V["shell"])),
    "connect to its iopub socket": attempt(lambda: connect(V["iopub"])),
}))
"""


@pytest.fixture(scope="module")
def attempts(agent: HostAgent, kernels: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """'attacker->victim' -> what came of each thing the attacker's kernel tried on the victim.
    b->b is the control: the same attempts on one's own kernel must all work."""
    results = {}
    for attacker, victim in (("a", "b"), ("b", "a"), ("b", "b")):
        info = kernels[victim]
        target = {
            "cwd": info["cwd"],
            "pid": info["pid"],
            "connection_file": info["connection_file"],
            "shell": endpoint(info, "shell"),
            "iopub": endpoint(info, "iopub"),
        }
        code = ATTEMPTS.replace("VICTIM", repr(target))
        results[f"{attacker}->{victim}"] = json.loads(run(agent, kernels[attacker]["id"], code))
    return results


def test_own_kernel_and_files_are_reachable(attempts: dict[str, dict[str, str]]) -> None:
    assert set(attempts["b->b"].values()) == {"allowed"}, attempts["b->b"]


@pytest.mark.parametrize("pair", ["a->b", "b->a"])
def test_tenant_cannot_reach_the_others_files_or_kernel(
    attempts: dict[str, dict[str, str]], pair: str
) -> None:
    assert attempts[pair].keys() == attempts["b->b"].keys()
    allowed = {what: how for what, how in attempts[pair].items() if how != "PermissionError"}
    assert allowed == {}, f"{pair}: {allowed}"


LISTEN_IN = r"""
import time, zmq
context = zmq.Context()
sub = context.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.setsockopt(zmq.LINGER, 0)
sub.connect("ipc://ENDPOINT")
heard = 0
deadline = time.monotonic() + SECONDS
while time.monotonic() < deadline:
    if sub.poll(100):
        sub.recv_multipart()
        heard += 1
sub.close()
context.term()
print(heard)
"""

TALK = r"""
import time
time.sleep(1.0)  # while the listeners connect
end = time.monotonic() + 2.0
while time.monotonic() < end:
    print("output only b may see", flush=True)
    time.sleep(0.05)
"""


async def listen_as_root(path: str, seconds: float) -> int:
    """The same eavesdropping as the agent's user, which may: the control."""
    context = zmq.asyncio.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(f"ipc://{path}")
    heard = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if await sub.poll(100):
            await sub.recv_multipart()
            heard += 1
    sub.close()
    context.term()
    return heard


def test_tenant_cannot_hear_the_others_kernel(
    agent: HostAgent, kernels: dict[str, dict[str, Any]]
) -> None:
    """A subscribes to everything on B's iopub socket while B prints for 2 s: A hears nothing,
    while root, listening the same way, hears B."""
    a, b = kernels["a"], kernels["b"]
    iopub = endpoint(b, "iopub")
    listen = LISTEN_IN.replace("ENDPOINT", iopub).replace("SECONDS", "4.0")

    async def together() -> tuple[str, str, int]:
        return await asyncio.gather(
            run_code(agent.url, agent.token, a["id"], listen),
            run_code(agent.url, agent.token, b["id"], TALK),
            listen_as_root(iopub, 4.0),
        )

    heard_by_a, said_by_b, heard_by_root = asyncio.run(together())
    assert said_by_b.count("output only b may see") > 10
    assert heard_by_root > 10
    assert int(heard_by_a) == 0


# -- refusing a kernel Python or folders that tenants cannot use ---------------------------------


def refusal(agent: HostAgent) -> str:
    reply = agent.call("POST", "/api/kernels", {"tenant": "a"})
    assert reply.status == 500, reply.body
    message = str(reply.body["message"])
    assert "\n" not in message
    assert agent.call("GET", "/api/kernels").body == []
    assert message in agent.log()
    return message


def test_refuses_a_kernel_python_tenants_cannot_run(kernel_python: str, tmp_path: Path) -> None:
    private = tmp_path / "private"  # under pytest's 0700 folder: only root can pass
    private.mkdir(mode=0o700)
    python = private / "python"
    python.symlink_to(kernel_python)
    with isolated_agent(str(python)) as agent:
        message = refusal(agent)
    assert message.startswith(
        f"kernels cannot start: tenant user gp-a cannot run the kernel Python {python} "
        "(Permission denied); pass --kernel-python"
    ), message


def test_refuses_a_kernel_python_without_ipykernel() -> None:
    python, _ = system_python()
    done = as_nobody(python, "-c", "import ipykernel")
    if done is None or done.returncode == 0:
        pytest.skip(f"{python} has ipykernel")
    with isolated_agent(python) as agent:
        message = refusal(agent)
    assert message.startswith(
        f"kernels cannot start: the kernel Python {python} has no ipykernel that tenant user "
        "gp-a can import; pass --kernel-python"
    ), message


def test_refuses_a_state_folder_tenants_cannot_enter(kernel_python: str) -> None:
    with isolated_agent(kernel_python, reachable=False) as agent:
        message = refusal(agent)
    assert message.startswith("kernels cannot start: tenant user gp-a cannot reach its working")
    assert "every folder above --state-dir must be searchable by others" in message
