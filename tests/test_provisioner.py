"""Pool kernels in any Jupyter client: `gpupool kernelspec sync` writes one kernelspec per pool
shape naming the `gpupool-provisioner`, and jupyter_client (here `jupyter execute`, papermill and
a plain KernelManager) starts, interrupts, restarts, suspends and shuts down a pool kernel of the
embedded stack through a local bridge, with nothing but GPUPOOL_URL and GPUPOOL_TOKEN set."""

from __future__ import annotations

import http.server
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import REPO, Gateway
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager
from test_gateway_faults import gateway as fault_gateway
from test_gateway_faults import join
from test_gateway_faults import started as started
from test_nbclient import NOTEBOOK, check_outputs
from traitlets.config import Config

SHAPE = "python3-gpu-h100-x1"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def client_env(
    stack: Gateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """A user's environment: their own Jupyter data and config folders, and only
    GPUPOOL_URL / GPUPOOL_TOKEN for the pool. Also applied to this process for the
    in-process KernelManager tests, and undone after."""
    home = tmp_path_factory.mktemp("user")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    env.update({
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_CONFIG_DIR": str(home / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "GPUPOOL_RECONNECT_S": "3",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": stack.token,
    })  # fmt: skip
    saved_env, saved_path = dict(os.environ), list(sys.path)
    os.environ.clear()
    os.environ.update(env)
    try:
        done = gpupool("kernelspec", "sync", env=env)
        assert done.returncode == 0, done.stderr
        yield env
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path


def gpupool(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpupool.cli", *args], env=env,
                          input=stdin, capture_output=True, text=True, timeout=60)  # fmt: skip


def files_under(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.is_file())


def test_sync_installs_one_kernelspec_per_shape_without_the_token(
    stack: Gateway, client_env: dict[str, str]
) -> None:
    kernels = Path(client_env["JUPYTER_DATA_DIR"]) / "kernels"
    names = sorted(p.name for p in kernels.iterdir())
    assert names == ["python3-gpu-a10g-x1", "python3-gpu-h100-x1", "python3-gpu-h100-x2"]
    spec = json.loads((kernels / SHAPE / "kernel.json").read_text())
    assert spec["display_name"] == "Python 3 · H100 ×1"  # noqa: RUF001
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "gpupool-provisioner", "config": {"kernel_name": SHAPE}}  # fmt: skip
    assert spec["metadata"]["gpupool"]["gpu_type"] == "H100"
    # A shape the pool no longer offers goes; a user's own kernelspec stays.
    gone, mine = kernels / "python3-gpu-v100-x8", kernels / "python3-gpu-mine"
    for folder, meta in ((gone, spec["metadata"]), (mine, {})):
        folder.mkdir()
        (folder / "kernel.json").write_text(json.dumps({**spec, "metadata": meta}))
    done = gpupool("kernelspec", "sync", env=client_env)
    assert done.returncode == 0 and "3 pool kernelspec(s)" in done.stdout, done.stderr
    assert not gone.exists() and mine.exists()
    listed = subprocess.run([BIN / "jupyter", "kernelspec", "list", "--json"], env=client_env,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert {"python3", SHAPE} <= set(json.loads(listed)["kernelspecs"])  # local python3 stays
    for path in files_under(Path(client_env["JUPYTER_DATA_DIR"])):
        assert stack.token not in path.read_text(errors="replace"), path
    (mine / "kernel.json").unlink()
    mine.rmdir()


def test_jupyter_execute_runs_the_example_on_a_pool_kernel(
    stack: Gateway, client_env: dict[str, str], tmp_path: Path
) -> None:
    notebook = tmp_path / "gpu-kernel.ipynb"
    notebook.write_bytes(NOTEBOOK.read_bytes())
    done = subprocess.run([BIN / "jupyter", "execute", "--inplace", str(notebook)],
                          env=client_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    check_outputs(nbformat.read(notebook, as_version=4))
    assert "gpupool: pool kernel" in done.stderr  # the provisioner says where it started
    assert stack.token not in done.stdout + done.stderr
    assert stack.call("GET", "/api/kernels").body == []  # shut down at the end


def test_papermill_runs_the_example_on_a_pool_kernel(
    stack: Gateway, client_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out.ipynb"
    done = subprocess.run([BIN / "papermill", str(NOTEBOOK), str(out)], env=client_env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    check_outputs(nbformat.read(out, as_version=4))
    assert stack.token not in done.stdout + done.stderr
    assert stack.call("GET", "/api/kernels").body == []


def run(kc: Any, code: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
    """Execute `code`; its reply's content and the text it printed or returned."""
    seen: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        content = msg["content"]
        seen.append(content.get("text") or content.get("data", {}).get("text/plain", ""))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(seen)


def gateway_state(stack: Gateway, kernel_id: str) -> str:
    reply = stack.call("GET", f"/api/kernels/{kernel_id}")
    return str(reply.body["gpupool"]["state"]) if reply.status == 200 else str(reply.status)


def test_interrupt_restart_suspend_shutdown_through_the_bridge(
    stack: Gateway, client_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    km = KernelManager(kernel_name=SHAPE)
    km.start_kernel(env={**client_env, "KERNEL_IDLE_TIMEOUT": "3"})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kernel_id = km.provisioner.gateway_kernel_id  # type: ignore[union-attr]
        assert gateway_state(stack, kernel_id) == "running"
        # What a client can see holds no token: the connection file (0600), the bridge's
        # command line.
        connection = Path(km.connection_file)
        assert stat.S_IMODE(connection.stat().st_mode) == 0o600
        assert stack.token not in connection.read_text()
        pid = km.provisioner.pid  # type: ignore[union-attr]
        assert stack.token not in Path(f"/proc/{pid}/cmdline").read_text()

        reply, text = run(kc, "x = 41\nx + 1")
        assert reply["status"] == "ok" and text == "42"

        kc.execute("import time; time.sleep(60)")
        time.sleep(1)
        started = time.monotonic()
        km.interrupt_kernel()
        interrupted = kc.get_shell_msg(timeout=15)["content"]
        assert interrupted["status"] == "error" and interrupted["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 10

        # Idle suspend and resume behind the bridge: the next cell brings x back.
        stack.wait_for(lambda: gateway_state(stack, kernel_id) == "suspended", 30, "suspend")
        # What a client that connects anew asks first is answered without a GPU: it stays
        # suspended, and nothing is billed for the question.
        info = kc.kernel_info(reply=True, timeout=10)["content"]
        assert info["status"] == "ok" and info["language_info"]["name"] == "python"
        time.sleep(1)
        assert gateway_state(stack, kernel_id) == "suspended"
        reply, text = run(kc, "x")
        assert reply["status"] == "ok" and text == "41"
        assert gateway_state(stack, kernel_id) == "running"

        km.restart_kernel()
        kc.wait_for_ready(timeout=120)  # a restart right after a resume: over 60 s once in CI
        assert km.provisioner.gateway_kernel_id == kernel_id  # type: ignore[union-attr]
        reply, text = run(kc, "print('x' in globals())")
        assert reply["status"] == "ok" and text.strip() == "False"
        assert km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert stack.call("GET", "/api/kernels").body == []
    assert gateway_state(stack, kernel_id) == "404"
    assert stack.token not in caplog.text and "gpupool: pool kernel" in caplog.text


def test_pipelined_requests_through_the_bridge_are_all_answered(
    stack: Gateway, client_env: dict[str, str]
) -> None:
    """Requests a client sends while replies arrive (five at a time) are all answered, end to
    end (bridge, gateway, host): where a send to a ZMQ socket bypassed the reader's own loop
    (the host's, towards the kernel; the bridge's, towards the client), it could take the
    wakeup of a message that came meanwhile, which then waited unread with all after it."""
    km = KernelManager(kernel_name=SHAPE)
    km.start_kernel(env=client_env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        for _ in range(200):
            waiting = {kc.kernel_info() for _ in range(5)}
            while waiting:
                reply = kc.get_shell_msg(timeout=10)
                waiting.discard(reply["parent_header"].get("msg_id"))
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_a_queued_start_says_its_position_and_waits_for_the_gpu(
    stack: Gateway, client_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    both = stack.create(name="python3-gpu-h100-x2")  # holds both H100s
    stack.wait_for(lambda: gateway_state(stack, both["id"]) == "running", 30, "the H100 x2")
    km = KernelManager(kernel_name=SHAPE)
    starting = threading.Thread(target=km.start_kernel, kwargs={"env": client_env})
    starting.start()
    try:
        stack.wait_for(lambda: "queued for H100 ×1, position 1" in caplog.text, 30, "queued")  # noqa: RUF001
        assert starting.is_alive()  # waiting for a GPU, not failing
        assert stack.call("DELETE", f"/api/kernels/{both['id']}").status == 204
        starting.join(60)
        assert not starting.is_alive() and km.is_alive()
    finally:
        starting.join(60)
        if km.has_kernel:
            km.shutdown_kernel()
    assert stack.call("GET", "/api/kernels").body == []


def test_in_lab_a_queued_start_returns_at_once_and_the_bridge_waits(
    stack: Gateway, client_env: dict[str, str]
) -> None:
    """As the Lab server extension configures it: the start returns while the kernel is queued
    (so Lab can show it queued, and can end the notebook's old kernel that holds the GPU); a
    request sent meanwhile is answered once the kernel has its GPU."""
    both = stack.create(name="python3-gpu-h100-x2")  # holds both H100s
    stack.wait_for(lambda: gateway_state(stack, both["id"]) == "running", 30, "the H100 x2")
    config = Config()
    config.GpupoolProvisioner.wait_for_gpu = False
    km = KernelManager(kernel_name=SHAPE, config=config)
    began = time.monotonic()
    km.start_kernel(env={**client_env})
    kc = km.client()
    try:
        assert time.monotonic() - began < 10
        kernel_id = km.provisioner.gateway_kernel_id  # type: ignore[union-attr]
        assert gateway_state(stack, kernel_id) == "queued"
        kc.start_channels()
        msg_id = kc.execute("import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
        time.sleep(1)
        assert km.is_alive()  # the bridge waits with the request
        assert stack.call("DELETE", f"/api/kernels/{both['id']}").status == 204
        reply = kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok"
        assert gateway_state(stack, kernel_id) == "running"
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel()
    assert stack.call("GET", "/api/kernels").body == []


def test_in_lab_a_kernel_shut_down_while_queued_leaves_nothing(
    stack: Gateway, client_env: dict[str, str]
) -> None:
    both = stack.create(name="python3-gpu-h100-x2")  # holds both H100s
    stack.wait_for(lambda: gateway_state(stack, both["id"]) == "running", 30, "the H100 x2")
    config = Config()
    config.GpupoolProvisioner.wait_for_gpu = False
    km = KernelManager(kernel_name=SHAPE, config=config)
    km.start_kernel(env={**client_env})
    kernel_id = km.provisioner.gateway_kernel_id  # type: ignore[union-attr]
    assert gateway_state(stack, kernel_id) == "queued"
    began = time.monotonic()
    km.shutdown_kernel()
    assert time.monotonic() - began < 15  # the waiting bridge ends on SIGTERM
    assert gateway_state(stack, kernel_id) == "404"  # no GPU goes to a kernel nobody has
    assert stack.call("DELETE", f"/api/kernels/{both['id']}").status == 204


def test_a_pool_kernel_that_dies_is_a_dead_kernel_and_restarts_anew(
    stack: Gateway, client_env: dict[str, str], tmp_path: Path
) -> None:
    """The pool kernel's process ends: the bridge exits with the gateway's reason, the client
    sees a dead kernel, and a restart (what an autorestarter does) starts a new pool kernel."""
    km = KernelManager(kernel_name=SHAPE)
    log = tmp_path / "bridge.log"
    stderr = open(log, "w")  # the restart starts its bridge with it too
    km.start_kernel(env=client_env, stderr=stderr)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        first = km.provisioner.gateway_kernel_id  # type: ignore[union-attr]
        kc.execute("import os; os._exit(1)")
        deadline = time.monotonic() + 30
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not km.is_alive()
        assert "the kernel process ended unexpectedly" in log.read_text()
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        assert km.provisioner.gateway_kernel_id != first  # type: ignore[union-attr]
        assert run(kc, "1 + 1")[1] == "2"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
        stderr.close()
    assert stack.call("GET", "/api/kernels").body == []


def test_a_bridge_nobody_talks_to_holds_no_websocket_and_sees_its_kernel_end(
    stack: Gateway, client_env: dict[str, str]
) -> None:
    """In Lab no client talks to the bridge (the browser's websocket goes past it), so it holds
    no websocket at the gateway, which would relay every IOPub message a second time; the first
    client opens one. Without one, the bridge learns of its kernel's end by asking."""
    km = KernelManager(kernel_name=SHAPE)
    km.start_kernel(env={**client_env, "GPUPOOL_BRIDGE_POLL_S": "0.5"})
    kernel_id = km.provisioner.gateway_kernel_id  # type: ignore[union-attr]
    kc = km.client()
    try:
        time.sleep(1)  # what a websocket opened meanwhile would need to show
        assert stack.call("GET", f"/api/kernels/{kernel_id}").body["connections"] == 0
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        assert run(kc, "1 + 1")[1] == "2"
        assert stack.call("GET", f"/api/kernels/{kernel_id}").body["connections"] == 1
        kc.stop_channels()
        second = KernelManager(kernel_name=SHAPE)
        second.start_kernel(env={**client_env, "GPUPOOL_BRIDGE_POLL_S": "0.5"})
        other = second.provisioner.gateway_kernel_id  # type: ignore[union-attr]
        assert stack.call("DELETE", f"/api/kernels/{other}").status == 204
        deadline = time.monotonic() + 15
        while second.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not second.is_alive()  # a dead kernel to its client, as with a websocket
        second.shutdown_kernel()
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert stack.call("GET", "/api/kernels").body == []


def test_wrong_token_is_named_never_printed(stack: Gateway, client_env: dict[str, str]) -> None:
    wrong = "w" * 64
    env = {**client_env, "GPUPOOL_TOKEN": wrong}
    done = gpupool("kernelspec", "sync", env=env)
    assert done.returncode == 1
    assert "does not accept this tenant token" in done.stderr and wrong not in done.stderr
    km = KernelManager(kernel_name=SHAPE)
    with pytest.raises(RuntimeError, match="does not accept this tenant token") as raised:
        km.start_kernel(env=env)
    assert wrong not in str(raised.value)
    assert stack.call("GET", "/api/kernels").body == []


def test_login_checks_the_token_and_saves_it_0600(
    stack: Gateway, client_env: dict[str, str]
) -> None:
    env = {k: v for k, v in client_env.items() if k != "GPUPOOL_TOKEN"}
    done = gpupool("login", "--url", stack.url, env=env, stdin="w" * 64 + "\n")
    assert done.returncode == 1 and "does not accept this tenant token" in done.stderr
    done = gpupool("login", "--url", stack.url, env=env, stdin=stack.token + "\n")
    assert done.returncode == 0, done.stderr
    assert stack.token not in done.stdout + done.stderr
    saved = Path(env["XDG_CONFIG_HOME"]) / "gpupool" / "credentials"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
    done = gpupool("kernelspec", "sync", env=env)  # the saved token, for its own URL only
    assert done.returncode == 0, done.stderr
    other = gpupool("kernelspec", "sync", env={**env, "GPUPOOL_URL": "http://127.0.0.1:9"})
    assert other.returncode == 1 and "GPUPOOL_TOKEN is not set" in other.stderr
    saved.unlink()


class RefusingGateway(http.server.BaseHTTPRequestHandler):
    """A gateway answering every request with one status and a JSON message."""

    status = 402

    def _answer(self) -> None:
        body = json.dumps({"reason": "no", "message": f"refused with {self.status}, on purpose"})
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status", [402, 503])
def test_a_refusing_gateway_is_one_clear_error(client_env: dict[str, str], status: int) -> None:
    handler = type("Refusing", (RefusingGateway,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        km = KernelManager(kernel_name=SHAPE)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=f"answered {status}: refused with {status}"):
            km.start_kernel(env={**client_env, "GPUPOOL_URL": url})
        assert time.monotonic() - started < 10
        done = gpupool("kernelspec", "sync", env={**client_env, "GPUPOOL_URL": url})
        assert done.returncode == 1 and f"answered {status}" in done.stderr
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
@pytest.mark.timeout(240)  # a gateway restart and a reconnect, slow on a busy machine
def test_gateway_outage_is_bridged_then_ends_the_kernel_with_a_reason(
    client_env: dict[str, str], tmp_path: Path, started: list[Any]
) -> None:
    """Nothing listening: the start fails at once, saying so. A gateway killed under a running
    kernel and back within GPUPOOL_RECONNECT_S: the bridge reconnects and the kernel goes on
    with its variables. Killed for good: the client sees the kernel die (no hang), with the
    reason on the bridge's stderr."""
    km = KernelManager(kernel_name=SHAPE)
    with pytest.raises(RuntimeError, match="cannot reach the gateway"):
        km.start_kernel(env={**client_env, "GPUPOOL_URL": "http://127.0.0.1:9"})

    gw = fault_gateway(tmp_path, started)
    join(tmp_path, started, gw)
    # 30 s: a restarted gateway took 16 s to listen on a loaded 2-core machine.
    env = {**client_env, "GPUPOOL_URL": gw.url, "GPUPOOL_TOKEN": gw.tenant("outage"),
           "GPUPOOL_RECONNECT_S": "30"}  # fmt: skip
    os.environ.update(env)
    log = tmp_path / "bridge.log"
    km = KernelManager(kernel_name=SHAPE)
    kc = None
    try:
        with open(log, "w") as stderr:
            km.start_kernel(env=env, stderr=stderr)
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        assert run(kc, "x = 6\nx * 7")[1] == "42"

        gw.proc.kill()
        gw.proc.wait(10)
        time.sleep(1)
        again = fault_gateway(tmp_path, started, port=int(gw.url.rsplit(":", 1)[1]))
        assert run(kc, "x + 1", timeout=90)[1] == "7"  # the same kernel, a new websocket

        again.proc.kill()
        again.proc.wait(10)
        deadline = time.monotonic() + 60
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not km.is_alive()
        assert "could not reconnect within 30 s" in log.read_text()
    finally:
        os.environ.update(client_env)
        if kc is not None:
            kc.stop_channels()
        km.shutdown_kernel(now=True)  # its DELETE fails (logged): the gateway is gone


def test_argv_alone_starts_and_ends_its_own_pool_kernel(
    stack: Gateway, client_env: dict[str, str], tmp_path: Path
) -> None:
    """A client that launches the kernelspec's argv itself, without jupyter_client's
    provisioners (VS Code's own launcher does): the bridge starts the pool kernel, a SIGINT
    interrupts it, and a shutdown_request ends the bridge and deletes the kernel."""
    spec = json.loads(
        (Path(client_env["JUPYTER_DATA_DIR"]) / "kernels" / SHAPE / "kernel.json").read_text()
    )
    km = KernelManager()  # only for a connection file with free ports and a key
    km.write_connection_file()
    argv = [a.replace("{connection_file}", km.connection_file) for a in spec["argv"]]
    bridge = subprocess.Popen(argv, env=client_env, stderr=subprocess.PIPE, text=True)
    kc = BlockingKernelClient()
    kc.load_connection_file(km.connection_file)
    # A client without a KernelManager calls the kernel dead after one heartbeat missed by 1 s,
    # which a loaded 2-core machine can miss; the bridge's own death is checked below.
    kc.hb_channel.time_to_dead = 10.0
    kc.start_channels()
    try:
        try:
            kc.wait_for_ready(timeout=60)
        except RuntimeError as error:
            ended = bridge.poll() is not None
            if not ended:
                bridge.kill()
            said = bridge.stderr.read() if bridge.stderr else ""
            kernels = stack.call("GET", "/api/kernels").body
            raise AssertionError(
                f"{error}; the bridge {'ended' if ended else 'was still running'} and said: "
                f"{said!r}; the gateway's kernels: {kernels}; its log ends: {stack.log()}"
            ) from None
        kernel_id = stack.call("GET", "/api/kernels").body[0]["id"]
        assert run(kc, "21 * 2")[1] == "42"
        kc.execute("import time; time.sleep(60)")
        time.sleep(1)
        bridge.send_signal(2)  # SIGINT
        assert kc.get_shell_msg(timeout=15)["content"]["ename"] == "KeyboardInterrupt"
        kc.shutdown()
        assert bridge.wait(20) == 0
    finally:
        kc.stop_channels()
        if bridge.poll() is None:
            bridge.kill()
        km.cleanup_connection_file()
    assert gateway_state(stack, kernel_id) == "404"
    assert stack.token not in (bridge.stderr.read() if bridge.stderr else "")


def test_legacy_framing_matches_jupyter_server() -> None:
    """Towards a gateway without the v1 subprotocol the bridge speaks jupyter_server's legacy
    framing: JSON text, or its binary form when a message has buffers."""
    from jupyter_server.services.kernels.connection.base import (
        deserialize_binary_message,
        serialize_binary_message,
    )

    from jupyter_ext.kernel_bridge import legacy_message, legacy_parts

    parts = [json.dumps(x).encode() for x in ({"msg_id": "1"}, {}, {"m": 1}, {"c": [1, 2]})]
    text = legacy_message("shell", parts)
    assert isinstance(text, str) and json.loads(text)["channel"] == "shell"
    assert legacy_parts(text) == ("shell", parts)
    binary = legacy_message("iopub", [*parts, b"\x00buffer", b"two"])
    assert isinstance(binary, bytes)
    theirs = deserialize_binary_message(binary)
    assert theirs["content"] == {"c": [1, 2]} and [bytes(b) for b in theirs["buffers"]] == [
        b"\x00buffer", b"two"]  # fmt: skip
    again = serialize_binary_message({**theirs, "buffers": [b"\x00buffer", b"two"]})
    assert legacy_parts(again) == ("iopub", [*parts, b"\x00buffer", b"two"])
