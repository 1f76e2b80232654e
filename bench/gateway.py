"""Gateway benchmark: kernel ready time, execute round trip, concurrent starts, IOPub throughput.

Run from the repository root:

    .venv/bin/python bench/gateway.py [--runs N] [--iterations N] [--iopub-runs N]

Everything is measured in one run, on loopback, against baselines measured in the same run: a
kernel started and spoken to directly with jupyter_client over ZMQ, and a stock jupyter_server
with local kernels. One `gpupool gateway` is started with two hosts joined to it: a "warm" host
with 40 fake H100s and its default warm pool (one warm kernel per GPU shape, and a CPU one), and
a "cold" host with 8 fake A10Gs and `--warm-per-shape 0`, so that every A10G kernel is a cold
start. A stock jupyter_server in gateway mode (`--gateway-url`, the bench tenant's token) is
started in front of the gateway, with no gpupool code and no GPUPOOL_* variables.

1. Kernel ready: from `POST /api/kernels` to the first kernel_info_reply over the kernel's
   websocket (opened after the 201), warm (H100) and cold (A10G), straight to the gateway and
   through jupyter_server in gateway mode. Baselines: jupyter_client's `start_kernel` then its
   first kernel_info_reply (the "vs direct" column), `start_kernel` then `wait_for_ready`
   (which adds a 0.2 s wait for IOPub to go silent), and a stock jupyter_server starting a
   local kernel. Before each start the bench waits (bounded) until its own processes are idle:
   the warm pool has refilled and the refill kernel has booted, and kernels shut down earlier
   are gone.
2. Execute round trip of `1+1`: execute_request until both the execute_reply and the idle status
   have arrived, over each websocket and directly over ZMQ, in interleaved rounds. The gateway
   kernel is also reached at its host's own websocket (a diagnostic row), to tell the gateway's
   relay hop from the host's ZMQ-to-websocket bridge.
3. Concurrent starts: 8, then 32, H100 kernels requested at once straight from the gateway,
   each timed to its first kernel_info_reply over its websocket.
4. IOPub throughput: a cell that writes 20 MiB to stdout; every byte of stream output is counted.

Every wait is bounded, and every kernel and process started is stopped at the end, also on
error or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from conftest import Gateway, HostAgent, free_port, start_gateway, start_host  # noqa: E402
from kernel_ws import V1, KernelSocket  # noqa: E402

from bench.harness import describe_machine, log, run_lines, run_main  # noqa: E402

WARM_SPEC = "python3-gpu-h100-x1"  # served by the warm host
COLD_SPEC = "python3-gpu-a10g-x1"  # served by the host with --warm-per-shape 0
WARM_GPUS = "H100:40"  # enough for 32 concurrent starts, the warm kernel and the round trips
COLD_GPUS = "A10G:8"
IOPUB_MIB = 20
IOPUB_BYTES = IOPUB_MIB << 20
IOPUB_CODE = (
    "import sys\n"
    f"for _ in range({IOPUB_MIB}):\n"
    "    sys.stdout.write('x' * (1 << 20))\n"
    "    sys.stdout.flush()\n"
)
CONCURRENT = (8, 32)
TIMEOUT = 60.0  # seconds: the most any single step may take
CONCURRENT_TIMEOUT = 150.0  # seconds: the most one of many concurrent starts may take
QUIET_LIMIT = 10.0  # seconds to wait for the bench's own processes to go idle
TARGET_WARM_MS = 150.0
TARGET_RTT_RATIO = 1.5
LOCAL_NOISE = 1.05  # "no slower than" allows 5%: both paths sit on the same ~40 ms Nagle stall
NOT_QUIET: list[str] = []  # waits for idle processes that gave up


# -- small helpers ---------------------------------------------------------------------------


def ms(seconds: float) -> str:
    value = seconds * 1000
    if value < 10:
        return f"{value:.2f} ms"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def median(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def ratio(value: float, base: float | None) -> str:
    if not base:
        return "n/a"
    r = value / base
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def left(deadline: float) -> float:
    seconds = deadline - time.monotonic()
    if seconds <= 0:
        raise TimeoutError("no answer from the kernel in time")
    return seconds


def _tree_ticks() -> int | None:
    """CPU ticks used by every process this bench started (children, grandchildren: kernels),
    reaped ones included (their time moves into their parent's cutime/cstime)."""
    procs: dict[int, tuple[int, int]] = {}
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return None
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2 :].split()
        procs[int(entry.name)] = (int(rest[1]), sum(int(v) for v in rest[11:15]))
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in procs.items():
        children[ppid].append(pid)
    total, stack = 0, list(children[os.getpid()])
    while stack:
        pid = stack.pop()
        total += procs[pid][1]
        stack.extend(children[pid])
    return total


async def wait_quiet(what: str, limit: float = QUIET_LIMIT) -> None:
    """Until the processes this bench started use under 10% of one core for two consecutive
    0.25 s windows (so other work on a shared machine does not count), at most `limit` s."""
    if _tree_ticks() is None:
        await asyncio.sleep(1.0)
        return
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + limit
    quiet = 0
    while time.monotonic() < deadline:
        before = _tree_ticks() or 0
        t0 = time.monotonic()
        await asyncio.sleep(0.25)
        used = ((_tree_ticks() or 0) - before) / hz / (time.monotonic() - t0)
        quiet = quiet + 1 if 0 <= used < 0.10 else 0
        if quiet >= 2:
            return
    NOT_QUIET.append(what)
    log(f"the bench's processes were still busy after {limit:.0f} s ({what}); measuring anyway")


# -- HTTP and servers -------------------------------------------------------------------------


@dataclass
class Server:
    """Something that serves the Jupyter kernels API: the gateway or a jupyter_server."""

    name: str
    url: str
    token: str


class Http:
    def __init__(self) -> None:
        # Our own client, with room for every concurrent start (tornado's shared one has 10).
        self.client = AsyncHTTPClient(force_instance=True, max_clients=256)

    async def call(
        self, server: Server, method: str, path: str, body: Any = None, timeout: float = TIMEOUT
    ) -> tuple[int, Any]:
        data = json.dumps(body) if body is not None else ("{}" if method == "POST" else None)
        request = HTTPRequest(
            server.url + path,
            method=method,
            headers={"Authorization": f"token {server.token}", "Content-Type": "application/json"},
            body=data,
            request_timeout=timeout,
            connect_timeout=timeout,
        )
        response = await self.client.fetch(request, raise_error=False)
        if response.code == 599:
            raise ConnectionError(f"{method} {server.url}{path}: {response.error}")
        text = response.body or b""
        try:
            return response.code, json.loads(text) if text else None
        except ValueError:
            return response.code, text.decode(errors="replace")


@dataclass
class JupyterServer:
    proc: subprocess.Popen[bytes]
    server: Server
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def spawn_jupyter_server(where: Path, name: str, gateway: Server | None) -> JupyterServer:
    """A stock `python -m jupyter_server` on loopback, with its own token; in gateway mode when
    `gateway` is given. A clean environment: no GPUPOOL_* or JUPYTER_* variables."""
    where.mkdir(parents=True)
    port = free_port()
    token = f"bench-{port}-{secrets.token_hex(8)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    env["JUPYTER_RUNTIME_DIR"] = str(where / "runtime")
    env["JUPYTER_CONFIG_DIR"] = str(where / "config")
    command = [sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
               "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={where}", "--allow-root",
               # Stock: not our server extension, which `make install` enables in the venv.
               "--ServerApp.jpserver_extensions=jupyter_ext=False"]  # fmt: skip
    if gateway is not None:
        command += [f"--gateway-url={gateway.url}", f"--GatewayClient.auth_token={gateway.token}",
                    "--GatewayClient.request_timeout=120"]  # fmt: skip
    log_path = where / "jupyter-server.log"
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=where
        )
    return JupyterServer(proc, Server(name, f"http://127.0.0.1:{port}", token), log_path)


def wait_jupyter_server(js: JupyterServer) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if js.proc.poll() is not None:
            raise RuntimeError(f"jupyter_server exited with {js.proc.returncode}: {js.log()}")
        try:
            url = f"{js.server.url}/api/status?token={js.server.token}"
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"jupyter_server did not answer within 90 s: {js.log()}")


class DirectKernel:
    """A kernel started and spoken to directly with jupyter_client (the baseline), with this
    Python's `python3` kernelspec: on IPC sockets like the hosts' kernels, or (`transport`
    "tcp") on TCP loopback like a Jupyter server's own local kernels."""

    def __init__(self, where: Path, transport: str = "ipc") -> None:
        where = Path(tempfile.mkdtemp(prefix="direct-", dir=where))
        ipc = {"ip": str(where / "kernel")} if transport == "ipc" else {}
        self.km = AsyncKernelManager(
            kernel_name="python3",
            transport=transport,
            connection_file=str(where / "kernel.json"),
            **ipc,
        )
        self.kc: Any = None

    async def start(self) -> None:
        await asyncio.wait_for(self.km.start_kernel(), TIMEOUT)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=TIMEOUT)

    async def execute(self, code: str) -> tuple[int, dict[str, Any]]:
        """Run `code`; the bytes of stdout it printed and its execute_reply content, once both
        the reply and the idle status have arrived."""
        msg_id = self.kc.execute(code, store_history=False)
        reply: dict[str, Any] | None = None
        idle = False
        out = 0
        deadline = time.monotonic() + TIMEOUT
        while not idle:
            msg = await self.kc.get_iopub_msg(timeout=left(deadline))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream" and msg["content"]["name"] == "stdout":
                out += len(msg["content"]["text"].encode())
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        while reply is None:
            msg = await self.kc.get_shell_msg(timeout=left(deadline))
            if msg["parent_header"].get("msg_id") == msg_id:
                reply = msg["content"]
        return out, reply

    async def stop(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        with contextlib.suppress(Exception):
            if self.km.has_kernel:
                await asyncio.wait_for(self.km.shutdown_kernel(now=True), 20)


async def socket_execute(sock: KernelSocket, code: str) -> tuple[int, dict[str, Any]]:
    """As DirectKernel.execute, over a kernel websocket (either framing)."""
    msg_id = await sock.send(
        "shell",
        "execute_request",
        {"code": code, "silent": False, "store_history": False, "user_expressions": {},
         "allow_stdin": False},
    )  # fmt: skip
    reply: dict[str, Any] | None = None
    idle = False
    out = 0
    deadline = time.monotonic() + TIMEOUT
    while reply is None or not idle:
        msg = await sock.recv(left(deadline))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "stream" and msg["content"]["name"] == "stdout":
            out += len(msg["content"]["text"].encode())
        elif kind == "execute_reply":
            reply = msg["content"]
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    return out, reply


# -- everything started, so that it can all be stopped ----------------------------------------


@dataclass
class Bench:
    where: Path
    http: Http = field(default_factory=Http)
    gateway: Gateway | None = None
    hosts: list[HostAgent] = field(default_factory=list)
    servers: list[JupyterServer] = field(default_factory=list)
    kernels: list[tuple[Server, str]] = field(default_factory=list)
    sockets: list[KernelSocket] = field(default_factory=list)
    direct: list[DirectKernel] = field(default_factory=list)
    protocols: dict[str, str | None] = field(default_factory=dict)  # server name -> subprotocol

    async def create(self, server: Server, name: str, timeout: float = TIMEOUT) -> str:
        status, body = await self.http.call(server, "POST", "/api/kernels", {"name": name}, timeout)
        if status != 201:
            raise RuntimeError(f"{server.name}: POST /api/kernels answered {status}: {body}")
        self.kernels.append((server, body["id"]))
        return str(body["id"])

    async def delete(self, server: Server, kernel_id: str) -> None:
        with contextlib.suppress(ValueError):
            self.kernels.remove((server, kernel_id))
        status, body = await self.http.call(server, "DELETE", f"/api/kernels/{kernel_id}")
        if status != 204:
            raise RuntimeError(f"{server.name}: DELETE {kernel_id} answered {status}: {body}")

    async def open(self, server: Server, kernel_id: str, timeout: float = TIMEOUT) -> KernelSocket:
        sock = await asyncio.wait_for(
            KernelSocket.open(server.url, server.token, kernel_id, V1), timeout
        )
        self.protocols[server.name] = sock.protocol
        self.sockets.append(sock)
        return sock

    def close(self, sock: KernelSocket) -> None:
        sock.close()
        with contextlib.suppress(ValueError):
            self.sockets.remove(sock)

    async def host_status(self, host: HostAgent) -> dict[str, Any]:
        status, body = await self.http.call(
            Server("host", host.url, host.token), "GET", "/api/host"
        )
        if status != 200:
            raise RuntimeError(f"GET /api/host answered {status}: {body}")
        return dict(body)

    async def wait_warm(self, host: HostAgent) -> None:
        """Until the warm host has its warm H100 kernel and its warm CPU kernel again."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            body = await self.host_status(host)
            if sum(int(g["warm"]) for g in body["gpus"]) >= 1 and int(body["warm"]) >= 2:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the warm pool did not refill within {TIMEOUT:.0f} s: {host.log()}")

    def logs(self) -> list[tuple[str, Callable[[], str]]]:
        started = [*self.hosts, *self.servers, *([self.gateway] if self.gateway else [])]
        return [(f"{getattr(p, 'url', '')}{p.log_path}", p.log) for p in started]

    async def cleanup(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(Exception):
                sock.close()
        if self.kernels:
            log(f"shutting down {len(self.kernels)} kernels left over")

        async def delete(server: Server, kernel_id: str) -> None:
            with contextlib.suppress(Exception):
                await self.http.call(server, "DELETE", f"/api/kernels/{kernel_id}", timeout=30)

        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(delete(s, k) for s, k in list(self.kernels))), 60
            )
        for kernel in self.direct:
            await kernel.stop()
        # jupyter_servers first (they speak to the gateway), then hosts (they stop their
        # kernels), then the gateway.
        stoppers = [*self.servers, *self.hosts, *([self.gateway] if self.gateway else [])]
        for proc in stoppers:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(proc.stop)


# -- measurements ------------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    samples: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    outs: list[int] = field(default_factory=list)
    check: str = ""

    def add(self, total: float, parts: dict[str, float] | None = None) -> None:
        self.samples.append(total)
        for name, seconds in (parts or {}).items():
            self.parts.setdefault(name, []).append(seconds)


async def ready_direct(bench: Bench, wait_for_ready: bool) -> tuple[float, dict[str, float]]:
    """`start_kernel`, then either the first kernel_info_reply (what every other path is timed
    to) or jupyter_client's `wait_for_ready`, which after that reply also waits for IOPub to
    stay silent for 0.2 s."""
    kernel = DirectKernel(bench.where)
    bench.direct.append(kernel)
    try:
        t0 = time.perf_counter()
        await asyncio.wait_for(kernel.km.start_kernel(), TIMEOUT)
        t1 = time.perf_counter()
        kernel.kc = kernel.km.client()
        kernel.kc.start_channels()
        if wait_for_ready:
            await kernel.kc.wait_for_ready(timeout=TIMEOUT)
        else:
            await kernel.kc.kernel_info(reply=True, timeout=TIMEOUT)
        t2 = time.perf_counter()
    finally:
        await kernel.stop()
        bench.direct.remove(kernel)
    then = "wait_for_ready" if wait_for_ready else "first kernel_info_reply"
    return t2 - t0, {"start_kernel": t1 - t0, then: t2 - t1}


async def ready_via(
    bench: Bench, server: Server, spec: str, warm_host: HostAgent | None = None
) -> tuple[float, dict[str, float]]:
    """POST /api/kernels, open the websocket, first kernel_info_reply; then shut it down.
    With `warm_host`, checks afterwards that the kernel was that host's warm kernel."""
    t0 = time.perf_counter()
    kernel_id = await bench.create(server, spec)
    t1 = time.perf_counter()
    sock = await bench.open(server, kernel_id)
    t2 = time.perf_counter()
    await sock.kernel_info(TIMEOUT)
    t3 = time.perf_counter()
    bench.close(sock)
    if warm_host is not None:
        claimed = (await bench.host_status(warm_host))["kernels"]
        starts = [k["gpupool"]["start"] for k in claimed]
        if starts != ["warm"]:
            raise RuntimeError(f"expected one warm kernel on the warm host, it has {starts}")
    await bench.delete(server, kernel_id)
    return t3 - t0, {"POST to 201": t1 - t0, "websocket open": t2 - t1, "kernel_info": t3 - t2}


async def measure_ready(
    bench: Bench, gw: Server, jsgw: Server, local: Server, warm_host: HostAgent, runs: int
) -> list[Series]:
    direct = Series("direct jupyter_client, cold, to first kernel_info_reply (baseline)")
    direct_wfr = Series("direct jupyter_client, cold, start_kernel + wait_for_ready")
    js_local = Series("stock jupyter_server, local kernel, cold (baseline)")
    gw_cold = Series("gateway websocket, cold (`--warm-per-shape 0` host)")
    js_cold = Series("jupyter_server gateway mode, cold")
    gw_warm = Series("gateway websocket, warm")
    js_warm = Series("jupyter_server gateway mode, warm")
    for run in range(runs):
        await bench.wait_warm(warm_host)
        await wait_quiet("before a warm start")
        gw_warm.add(*await ready_via(bench, gw, WARM_SPEC, warm_host))
        await wait_quiet("before a cold start")
        direct.add(*await ready_direct(bench, wait_for_ready=False))
        await wait_quiet("before a cold start")
        direct_wfr.add(*await ready_direct(bench, wait_for_ready=True))
        await wait_quiet("before a cold start")
        js_local.add(*await ready_via(bench, local, "python3"))
        await bench.wait_warm(warm_host)
        await wait_quiet("before a warm start")
        js_warm.add(*await ready_via(bench, jsgw, WARM_SPEC, warm_host))
        await wait_quiet("before a cold start")
        gw_cold.add(*await ready_via(bench, gw, COLD_SPEC))
        await wait_quiet("before a cold start")
        js_cold.add(*await ready_via(bench, jsgw, COLD_SPEC))
        log(
            f"kernel ready, run {run + 1}/{runs}: direct {ms(direct.samples[-1])}, "
            f"jupyter_server local {ms(js_local.samples[-1])}, "
            f"gateway cold {ms(gw_cold.samples[-1])} / warm {ms(gw_warm.samples[-1])}, "
            f"gateway mode cold {ms(js_cold.samples[-1])} / warm {ms(js_warm.samples[-1])}"
        )
    return [direct, direct_wfr, js_local, gw_cold, js_cold, gw_warm, js_warm]


class ExecPaths:
    """One kernel per path, run in interleaved rounds: direct over ZMQ, a stock jupyter_server's
    local kernel, and one gateway kernel (started through jupyter_server in gateway mode, so
    that both know it) reached straight at the gateway, through jupyter_server, and (to tell
    the gateway's relay from the host's own websocket) at its host, with the host's token."""

    LABELS = {
        "direct": "direct ZMQ, AsyncKernelClient (baseline)",
        "local": "stock jupyter_server, local kernel (baseline)",
        "host": "host agent websocket, no gateway (diagnostic)",
        "gateway": "gateway websocket",
        "jsgw": "jupyter_server gateway mode",
    }

    def __init__(
        self, bench: Bench, gw: Server, jsgw: Server, local: Server, warm_host: HostAgent
    ) -> None:
        self.bench = bench
        self.direct = DirectKernel(bench.where)
        self.warm_host = warm_host
        host = Server("host agent", warm_host.url, warm_host.token)
        self.servers: dict[str, Server | None] = {
            "direct": None, "local": local, "host": host, "gateway": gw, "jsgw": jsgw,
        }  # fmt: skip
        self.ids: dict[str, str] = {}

    async def start(self) -> None:
        self.bench.direct.append(self.direct)
        await self.direct.start()
        local, jsgw = self.servers["local"], self.servers["jsgw"]
        assert local and jsgw
        self.ids["local"] = await self.bench.create(local, "python3")
        self.ids["jsgw"] = self.ids["gateway"] = await self.bench.create(jsgw, WARM_SPEC)
        claimed = (await self.bench.host_status(self.warm_host))["kernels"]
        if len(claimed) != 1:
            raise RuntimeError(f"expected one kernel on the warm host, it has {claimed}")
        self.ids["host"] = claimed[0]["id"]

    async def stop(self) -> None:
        await self.direct.stop()
        self.bench.direct.remove(self.direct)
        local, jsgw = self.servers["local"], self.servers["jsgw"]
        assert local and jsgw
        await self.bench.delete(local, self.ids["local"])
        await self.bench.delete(jsgw, self.ids["jsgw"])

    async def rounds(
        self, code: str, counts: list[int], warmup: int, only: tuple[str, ...] = tuple(LABELS)
    ) -> dict[str, Series]:
        """For each count: `warmup` runs of `1+1`, then `count` timed runs of `code`, on each
        path in turn (a fresh websocket per round). Checks every reply; records every run's
        stdout bytes in `outs`."""
        series = {key: Series(self.LABELS[key]) for key in only}
        for count in counts:
            for key, one in series.items():
                server = self.servers[key]
                sock = None
                if server is not None:
                    sock = await self.bench.open(server, self.ids[key])
                try:
                    for _ in range(warmup):
                        await self.execute(sock, "1+1")
                    for _ in range(count):
                        t0 = time.perf_counter()
                        out, reply = await self.execute(sock, code)
                        one.samples.append(time.perf_counter() - t0)
                        if reply.get("status") != "ok":
                            raise RuntimeError(f"{one.label}: the cell failed: {reply}")
                        one.outs.append(out)
                finally:
                    if sock is not None:
                        self.bench.close(sock)
        return series

    async def execute(self, sock: KernelSocket | None, code: str) -> tuple[int, dict[str, Any]]:
        if sock is None:
            return await self.direct.execute(code)
        return await socket_execute(sock, code)


@dataclass
class Burst:
    n: int
    wall: float
    samples: list[float]
    errors: list[str]


async def concurrent_starts(bench: Bench, gw: Server, n: int) -> Burst:
    """`n` H100 kernels asked for at once straight from the gateway, each timed from its POST
    to its first kernel_info_reply; then all shut down."""
    ids: list[str] = []

    async def one() -> float:
        t0 = time.perf_counter()
        kernel_id = await bench.create(gw, WARM_SPEC, CONCURRENT_TIMEOUT)
        ids.append(kernel_id)
        sock = await bench.open(gw, kernel_id, CONCURRENT_TIMEOUT)
        try:
            await sock.kernel_info(CONCURRENT_TIMEOUT)
        finally:
            bench.close(sock)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    wall = time.perf_counter() - t0
    samples = [r for r in results if isinstance(r, float)]
    errors = [f"{type(r).__name__}: {r}"[:300] for r in results if isinstance(r, BaseException)]
    deletes = await asyncio.gather(
        *(bench.delete(gw, k) for k in ids), return_exceptions=True
    )  # fmt: skip
    errors += [f"shutdown: {r}"[:300] for r in deletes if isinstance(r, BaseException)]
    return Burst(n, wall, samples, errors)


# -- reporting ---------------------------------------------------------------------------------


def machine() -> str:
    return describe_machine(
        ("jupyter_server", "jupyter_client", "ipykernel", "tornado", "pyzmq"),
        "fake H100s and A10Gs",
    )


MEASURED = ("kernel_gateway", "gpu_host", "bench/gateway.py", "tests/kernel_ws.py")


@dataclass
class Row:
    what: str
    path: str
    n: str
    median: str
    p90: str
    vs_direct: str
    vs_local: str
    check: str


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| measurement | path | n | median | p90 | vs direct | vs jupyter_server local | check |",
        "|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.what} | {r.path} | {r.n} | {r.median} | {r.p90} | {r.vs_direct} | "
            f"{r.vs_local} | {r.check} |"
        )
    return lines


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


# -- main -------------------------------------------------------------------------------------


async def setup(bench: Bench) -> tuple[Server, Server, Server, HostAgent]:
    where = bench.where
    log("starting a gateway, a warm host, a cold host and two stock jupyter_servers")
    local_js = spawn_jupyter_server(where / "js-local", "jupyter_server local", None)
    bench.servers.append(local_js)
    (where / "gateway").mkdir()
    gateway: Gateway = await asyncio.to_thread(start_gateway, where / "gateway")
    bench.gateway = gateway
    gw_url = gateway.url
    tenant = await asyncio.to_thread(gateway.tenant, "bench")
    gw = Server("gateway", gw_url, tenant)
    gw_js = spawn_jupyter_server(where / "js-gateway", "jupyter_server gateway mode", gw)
    bench.servers.append(gw_js)
    join = [
        "--no-isolate", "--gateway", gw_url, f"--join-token={gateway.join_token}",
        "--heartbeat-seconds", "2",
    ]  # fmt: skip
    for name in ("warm", "cold"):
        (where / name).mkdir()

    async def host(name: str, *args: str) -> HostAgent:
        agent = await asyncio.to_thread(start_host, where / name, *args, *join)
        bench.hosts.append(agent)
        return agent

    warm_host, _cold_host = await asyncio.gather(
        host("warm", "--fake-gpus", WARM_GPUS),
        host("cold", "--fake-gpus", COLD_GPUS, "--warm-per-shape", "0"),
    )
    await asyncio.gather(*(asyncio.to_thread(wait_jupyter_server, js) for js in bench.servers))
    deadline = time.monotonic() + TIMEOUT
    while True:
        status, gpus = await bench.http.call(gw, "GET", "/api/gpus")
        totals = {g["gpu_type"]: g["total"] for g in gpus} if status == 200 else {}
        if totals.get("H100") == 40 and totals.get("A10G") == 8:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the hosts did not join the gateway: {status} {gpus}")
        await asyncio.sleep(0.1)
    await bench.wait_warm(warm_host)
    return gw, gw_js.server, local_js.server, warm_host


async def run_bench(args: argparse.Namespace, bench: Bench) -> None:
    started = time.perf_counter()
    gw, jsgw, local, warm_host = await setup(bench)
    log(f"set up in {time.perf_counter() - started:.0f} s; kernel ready, {args.runs} runs")
    ready = await measure_ready(bench, gw, jsgw, local, warm_host, args.runs)

    paths = ExecPaths(bench, gw, jsgw, local, warm_host)
    await paths.start()
    rounds = max(1, min(5, args.iterations // 40))
    counts = [args.iterations // rounds + (r < args.iterations % rounds) for r in range(rounds)]
    await wait_quiet("before the round trips")
    log(f"execute round trip: {args.iterations} per path, in {rounds} interleaved rounds")
    rtt = await paths.rounds("1+1", counts, warmup=10)
    await wait_quiet("before IOPub")
    log(f"IOPub: {IOPUB_MIB} MiB of stdout, {args.iopub_runs} runs per path")
    iopub = await paths.rounds(
        IOPUB_CODE, [1] * args.iopub_runs, warmup=2, only=("direct", "host", "gateway", "jsgw")
    )
    for series in iopub.values():
        wrong = [n for n in series.outs if n != IOPUB_BYTES]
        series.check = (
            f"all {IOPUB_BYTES} B arrived, every run"
            if not wrong
            else f"MISSING BYTES: got {wrong}, not {IOPUB_BYTES}"
        )
    await paths.stop()

    bursts = []
    for n in CONCURRENT:
        await bench.wait_warm(warm_host)
        await wait_quiet(f"before {n} concurrent starts", limit=30)
        log(f"{n} concurrent starts through the gateway")
        burst = await concurrent_starts(bench, gw, n)
        log(f"{n} concurrent: {len(burst.samples)}/{n} ready in {burst.wall:.1f} s")
        for error in burst.errors[:3]:
            log(f"  error: {error}")
        bursts.append(burst)
    elapsed = time.perf_counter() - started

    rows: list[Row] = []
    direct_base, local_base = median(ready[0].samples), median(ready[2].samples)
    for index, series in enumerate(ready):
        value = median(series.samples)
        check = ""
        if index >= 5:  # the warm paths
            check = f"target < {TARGET_WARM_MS:.0f} ms: {met(value * 1e3 < TARGET_WARM_MS)}"
        rows.append(
            Row("kernel ready", series.label, str(len(series.samples)), ms(value),
                ms(p90(series.samples)), ratio(value, direct_base), ratio(value, local_base),
                check)
        )  # fmt: skip
    direct_base, local_base = median(rtt["direct"].samples), median(rtt["local"].samples)
    for key, series in rtt.items():
        value = median(series.samples)
        check = "reply ok"
        if key == "gateway":
            ok = value / direct_base <= TARGET_RTT_RATIO
            check += f"; target <= {TARGET_RTT_RATIO}x direct: {met(ok)}"
        elif key == "jsgw":
            ok = value <= local_base * LOCAL_NOISE
            allowance = f"{LOCAL_NOISE - 1:.0%}"
            check += f"; target <= jupyter_server local (+{allowance} noise): {met(ok)}"
        rows.append(
            Row("execute `1+1` round trip", series.label, str(len(series.samples)), ms(value),
                ms(p90(series.samples)), ratio(value, direct_base), ratio(value, local_base),
                check)
        )  # fmt: skip
    single_base = median(ready[0].samples)
    for burst in bursts:
        ok = not burst.errors and len(burst.samples) == burst.n
        check = f"{len(burst.samples)}/{burst.n} ready, all in {burst.wall:.1f} s"
        if burst.n == max(CONCURRENT):
            check += f"; target all succeed: {met(ok)}"
        if burst.errors:
            check += f"; first error: {burst.errors[0][:120]}"
        samples = burst.samples or [float("nan")]
        rows.append(
            Row(f"{burst.n} concurrent starts, per start", "gateway websocket (H100, warm pool 1)",
                str(len(burst.samples)), ms(median(samples)), ms(p90(samples)),
                ratio(median(samples), single_base), "n/a", check)
        )  # fmt: skip
    base = median(iopub["direct"].samples)
    for series in iopub.values():
        value = median(series.samples)
        rows.append(
            Row(f"IOPub {IOPUB_MIB} MiB stdout", series.label, str(len(series.samples)),
                f"{value:.2f} s ({IOPUB_MIB / value:.0f} MiB/s)", f"{p90(series.samples):.2f} s",
                f"{ratio(value, base)} time, {base / value:.2f}x rate", "n/a", series.check)
        )  # fmt: skip

    for line in run_lines(machine(), MEASURED, elapsed):
        print(line)
    protocols = ", ".join(f"{k}: {v or 'legacy JSON'}" for k, v in sorted(bench.protocols.items()))
    print(f"websocket framing (v1 asked for everywhere): {protocols}")
    if NOT_QUIET:
        print(
            f"warning: {len(NOT_QUIET)} waits for the bench's processes to go idle gave up "
            f"({', '.join(sorted(set(NOT_QUIET)))}); those samples may include background work"
        )
    print()
    for line in table(rows):
        print(line)
    print()
    print("Kernel ready, medians of its parts:")
    print()
    for series in ready:
        parts = ", ".join(f"{name} {ms(median(v))}" for name, v in series.parts.items())
        print(f"- {series.label}: {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12, help="kernel starts per path (12)")
    parser.add_argument(
        "--iterations", type=int, default=300, help="execute round trips per path (300)"
    )
    parser.add_argument("--iopub-runs", type=int, default=5, help="20 MiB cells per path (5)")
    args = parser.parse_args()
    if min(args.runs, args.iterations, args.iopub_runs) < 1:
        parser.error("--runs, --iterations and --iopub-runs must be at least 1")

    run_main(
        "gpupool-bench-gw-",
        Bench,
        lambda started: run_bench(args, started),
        "the servers and kernels",
    )


if __name__ == "__main__":
    main()
