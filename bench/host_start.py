"""Host agent benchmark: kernel ready time, execute round trip and IOPub throughput.

Run from the repository root:

    .venv/bin/python bench/host_start.py [--runs N] [--iterations N] [--iopub-runs N]

Everything is measured in one run, each against a baseline measured in the same run: a kernel
started and spoken to directly with jupyter_client over ZMQ, on this machine. Two `gpupool host`
agents are started on loopback with two fake H100s: one with its warm pool (the default, one warm
kernel per shape) and one with `--warm-per-shape 0`, so that every kernel it serves is cold.

1. Kernel ready: from the request to the first kernel_info_reply. Direct: `start_kernel` then a
   kernel_info request over ZMQ. Agent: `POST /api/kernels` until 201, open the kernel's
   websocket, then a kernel_info round trip over it. Warm is measured twice: as soon as
   `GET /api/host` reports the warm kernel back, and once the machine is quiet again (the warm
   kernel's process has finished booting).
2. Execute round trip of `1+1`: execute_request until both the execute_reply and the idle status
   have arrived, over the agent's websocket in both framings and directly over ZMQ.
3. IOPub throughput: a cell that writes 20 MiB to stdout; every byte of stream output is counted.

Every wait is bounded, and the agents and kernels are stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import describe_machine, log, run_lines, run_main  # noqa: E402
from tests.kernel_ws import V1, KernelSocket  # noqa: E402

GPU_BODY = {"name": "python3", "gpu_type": "H100", "gpu_count": 1}
IOPUB_MIB = 20
IOPUB_BYTES = IOPUB_MIB << 20
IOPUB_CODE = (
    "import sys\n"
    f"for _ in range({IOPUB_MIB}):\n"
    "    sys.stdout.write('x' * (1 << 20))\n"
    "    sys.stdout.flush()\n"
)
TIMEOUT = 60.0  # seconds: the most any single step may take
WARM_WAIT = 60.0  # seconds to wait for the warm pool to refill
TARGET_WARM_MS = 50.0
TARGET_RTT_RATIO = 1.5
NOT_QUIET: list[float] = []  # when a wait for a quiet machine gave up (shared or busy machine)


# -- small helpers ---------------------------------------------------------------------------


def ms(seconds: float) -> str:
    value = seconds * 1000
    return (
        f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values), idle


async def wait_quiet(limit: float = 20.0, busy_below: float = 0.15) -> None:
    """Wait until the whole machine is nearly idle (no kernel still booting), at most `limit` s.

    Two consecutive 0.2 s windows with less than `busy_below` of all CPU time busy count as
    quiet. Where /proc/stat is missing, waits a fixed second instead."""
    if _cpu_times() is None:
        await asyncio.sleep(1.0)
        return
    deadline = time.monotonic() + limit
    quiet = 0
    while time.monotonic() < deadline:
        before = _cpu_times()
        await asyncio.sleep(0.2)
        after = _cpu_times()
        assert before and after
        total, idle = after[0] - before[0], after[1] - before[1]
        busy = 1 - idle / total if total else 0.0
        quiet = quiet + 1 if busy < busy_below else 0
        if quiet >= 2:
            return
    NOT_QUIET.append(time.monotonic())
    log(f"the machine did not become quiet within {limit:.0f} s; measuring anyway")


def left(deadline: float) -> float:
    """Seconds left before `deadline` (time.monotonic); raises once it has passed."""
    seconds = deadline - time.monotonic()
    if seconds <= 0:
        raise TimeoutError(f"no answer from the kernel within {TIMEOUT:.0f} s")
    return seconds


class BenchKernelSpecs(KernelSpecManager):
    """The one `python3` kernelspec the agent itself uses: this Python with ipykernel_launcher,
    whatever other kernelspecs are installed."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name != "python3":
            raise NoSuchKernel(kernel_name)
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="Python 3",
            language="python",
            resource_dir="",
        )


class DirectKernel:
    """A kernel started and spoken to directly with jupyter_client (the baseline): the same
    command as the agent's kernels, and like them on IPC sockets, in a folder of its own."""

    def __init__(self, where: Path) -> None:
        where = Path(tempfile.mkdtemp(prefix="direct-", dir=where))
        self.km = AsyncKernelManager(
            kernel_spec_manager=BenchKernelSpecs(),
            kernel_name="python3",
            transport="ipc",
            ip=str(where / "kernel"),
            connection_file=str(where / "kernel.json"),
        )
        self.kc: Any = None

    async def start(self) -> None:
        await asyncio.wait_for(self.km.start_kernel(), TIMEOUT)
        self.kc = self.km.client()
        self.kc.start_channels()

    async def kernel_info(self) -> None:
        await self.kc.kernel_info(reply=True, timeout=TIMEOUT)

    async def execute(self, code: str) -> tuple[int, dict[str, Any]]:
        """Run `code`; return the bytes of stdout it printed and its execute_reply content, once
        both the reply and the idle status have arrived."""
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
    """As DirectKernel.execute, over the agent's websocket (either framing)."""
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


# -- the agents ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HostAgent:
    """A `gpupool host` process on loopback, with the token it printed."""

    proc: subprocess.Popen[bytes]
    url: str
    token: str
    log_path: Path

    @classmethod
    def start(cls, where: Path, *args: str) -> HostAgent:
        port = free_port()
        log_path = where / "agent.log"
        command = [sys.executable, "-m", "gpu_host", "--ip", "127.0.0.1", "--port", str(port),
                   "--state-dir", str(where / "state"), *args]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
        with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=where
            )
        agent = cls(proc, "", "", log_path)
        deadline = time.monotonic() + TIMEOUT
        while not (agent.url and agent.token):
            if proc.poll() is not None or time.monotonic() > deadline:
                agent.stop()
                raise RuntimeError(f"gpupool host did not start: {agent.log()}")
            for line in log_path.read_text(errors="replace").splitlines():
                key, _, value = line.partition(": ")
                if key == "host":
                    agent.url = value.strip()
                elif key == "token":
                    agent.token = value.strip()
            time.sleep(0.05)
        return agent

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One JSON request with the host token: (status, decoded body or None)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text.decode(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM (the agent then shuts its kernels down), SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Agents:
    """Everything started, so that it can all be stopped at the end."""

    where: Path  # a temporary folder for the agents' state and logs and the direct kernels
    agents: list[HostAgent] = field(default_factory=list)
    kernels: list[tuple[HostAgent, str]] = field(default_factory=list)
    sockets: list[KernelSocket] = field(default_factory=list)
    direct: list[DirectKernel] = field(default_factory=list)

    def start(self, name: str, *args: str) -> HostAgent:
        where = self.where / name
        where.mkdir(parents=True)
        agent = HostAgent.start(where, "--fake-gpus", "H100:2", "--no-isolate", *args)
        self.agents.append(agent)
        return agent

    def create(self, agent: HostAgent) -> dict[str, Any]:
        status, body = agent.call("POST", "/api/kernels", GPU_BODY)
        if status != 201:
            raise RuntimeError(f"POST /api/kernels answered {status}: {body}")
        self.kernels.append((agent, body["id"]))
        return dict(body)

    def delete(self, agent: HostAgent, kernel_id: str) -> None:
        with contextlib.suppress(ValueError):
            self.kernels.remove((agent, kernel_id))
        status, body = agent.call("DELETE", f"/api/kernels/{kernel_id}")
        if status != 204:
            raise RuntimeError(f"DELETE /api/kernels/{kernel_id} answered {status}: {body}")

    async def open(self, agent: HostAgent, kernel_id: str, protocol: str | None) -> KernelSocket:
        sock = await asyncio.wait_for(
            KernelSocket.open(agent.url, agent.token, kernel_id, protocol), TIMEOUT
        )
        if sock.protocol != protocol:
            raise RuntimeError(f"asked for subprotocol {protocol}, got {sock.protocol}")
        self.sockets.append(sock)
        return sock

    def close(self, sock: KernelSocket) -> None:
        sock.close()
        with contextlib.suppress(ValueError):
            self.sockets.remove(sock)

    def logs(self) -> list[tuple[str, Callable[[], str]]]:
        return [(f"the agent at {agent.url}", agent.log) for agent in self.agents]

    async def cleanup(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(Exception):
                sock.close()
        for agent, kernel_id in self.kernels:
            with contextlib.suppress(Exception):
                agent.call("DELETE", f"/api/kernels/{kernel_id}")
        for kernel in self.direct:
            await kernel.stop()
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()


def warm_gpu_kernels(agent: HostAgent) -> tuple[int, int]:
    """(warm kernels holding an H100, all warm kernels) as `GET /api/host` reports them."""
    status, body = agent.call("GET", "/api/host")
    if status != 200:
        raise RuntimeError(f"GET /api/host answered {status}: {body}")
    return sum(int(gpu["warm"]) for gpu in body["gpus"]), int(body["warm"])


async def wait_warm(agent: HostAgent, full: int) -> None:
    """Until the agent reports a warm H100 kernel and its whole warm pool (`full`) again."""
    deadline = time.monotonic() + WARM_WAIT
    while time.monotonic() < deadline:
        gpu, total = warm_gpu_kernels(agent)
        if gpu >= 1 and total >= full:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"the warm pool did not refill within {WARM_WAIT:.0f} s: {agent.log()}")


# -- measurements ------------------------------------------------------------------------------


@dataclass
class Series:
    """Samples of one measured path, in seconds."""

    label: str
    samples: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    check: str = ""
    outs: list[int] = field(default_factory=list)

    def add_part(self, name: str, seconds: float) -> None:
        self.parts.setdefault(name, []).append(seconds)


async def start_direct(state: Agents) -> tuple[float, dict[str, float]]:
    kernel = DirectKernel(state.where)
    state.direct.append(kernel)
    try:
        t0 = time.perf_counter()
        await kernel.start()
        t1 = time.perf_counter()
        await kernel.kernel_info()
        t2 = time.perf_counter()
    finally:
        await kernel.stop()
        state.direct.remove(kernel)
    return t2 - t0, {"start_kernel": t1 - t0, "kernel_info": t2 - t1}


async def start_agent(
    state: Agents, agent: HostAgent, start: str
) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    model = state.create(agent)
    t1 = time.perf_counter()
    sock = await state.open(agent, model["id"], None)
    t2 = time.perf_counter()
    await sock.kernel_info(TIMEOUT)
    t3 = time.perf_counter()
    state.close(sock)
    state.delete(agent, model["id"])
    if model["gpupool"]["start"] != start:
        raise RuntimeError(f"expected a {start} kernel, the agent gave a {model['gpupool']}")
    return t3 - t0, {"POST to 201": t1 - t0, "websocket open": t2 - t1, "kernel_info": t3 - t2}


async def measure_starts(
    state: Agents, warm_agent: HostAgent, cold_agent: HostAgent, runs: int, full: int
) -> list[Series]:
    direct = Series("direct jupyter_client (baseline)")
    cold = Series("agent, cold (`--warm-per-shape 0`)")
    warm_now = Series("agent, warm, taken as soon as `/api/host` reports it")
    warm_quiet = Series("agent, warm, pool kernel booted (machine quiet)")

    async def one(
        series: Series, measure: Callable[[], Awaitable[tuple[float, dict[str, float]]]]
    ) -> None:
        total, parts = await measure()
        series.samples.append(total)
        for name, seconds in parts.items():
            series.add_part(name, seconds)

    for run in range(runs):
        await wait_quiet()
        await one(direct, lambda: start_direct(state))
        await wait_quiet()
        await one(cold, lambda: start_agent(state, cold_agent, "cold"))
        await wait_warm(warm_agent, full)
        await wait_quiet()
        await one(warm_quiet, lambda: start_agent(state, warm_agent, "warm"))
        await wait_warm(warm_agent, full)  # the pool's replacement is counted, maybe not booted
        await one(warm_now, lambda: start_agent(state, warm_agent, "warm"))
        log(
            f"kernel ready, run {run + 1}/{runs}: direct {ms(direct.samples[-1])}, "
            f"cold {ms(cold.samples[-1])}, warm (quiet) {ms(warm_quiet.samples[-1])}, "
            f"warm (as soon as reported) {ms(warm_now.samples[-1])}"
        )
    await wait_warm(warm_agent, full)
    return [direct, cold, warm_quiet, warm_now]


class ExecPaths:
    """One kernel directly over ZMQ and one through the agent, run in interleaved rounds."""

    LABELS = (
        "direct ZMQ, AsyncKernelClient (baseline)",
        "agent websocket, legacy JSON",
        "agent websocket, v1 binary",
    )

    def __init__(self, state: Agents, agent: HostAgent) -> None:
        self.state = state
        self.agent = agent
        self.direct = DirectKernel(state.where)
        self.kernel_id = ""

    async def start(self, full: int) -> None:
        self.state.direct.append(self.direct)
        await self.direct.start()
        await self.direct.kernel_info()
        await wait_warm(self.agent, full)
        self.kernel_id = self.state.create(self.agent)["id"]

    async def stop(self) -> None:
        await self.direct.stop()
        self.state.direct.remove(self.direct)
        self.state.delete(self.agent, self.kernel_id)

    async def rounds(self, code: str, counts: list[int], warmup: int) -> list[Series]:
        """For each count: `warmup` runs of `1+1`, then `count` timed runs of `code` on each
        path in turn (a fresh websocket per round). Checks every reply; records every run's
        stdout byte count in the series' `outs`."""
        series = [Series(label) for label in self.LABELS]
        for count in counts:
            for index, one in enumerate(series):
                sock = None
                if index:
                    protocol = None if index == 1 else V1
                    sock = await self.state.open(self.agent, self.kernel_id, protocol)
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
                        self.state.close(sock)
        return series

    async def execute(self, sock: KernelSocket | None, code: str) -> tuple[int, dict[str, Any]]:
        if sock is None:
            return await self.direct.execute(code)
        return await socket_execute(sock, code)


# -- reporting ---------------------------------------------------------------------------------


@dataclass
class Row:
    what: str
    path: str
    n: int
    median: str
    p90: str
    ratio: str
    check: str


def machine() -> str:
    return describe_machine(("jupyter_server", "jupyter_client", "ipykernel", "tornado", "pyzmq"))


MEASURED = ("gpu_host", "bench/host_start.py", "tests/kernel_ws.py")  # what the numbers depend on


def table(rows: list[Row]) -> Iterator[str]:
    yield "| measurement | path | n | median | p90 | vs baseline | check |"
    yield "|---|---|--:|--:|--:|--:|---|"
    for r in rows:
        yield f"| {r.what} | {r.path} | {r.n} | {r.median} | {r.p90} | {r.ratio} | {r.check} |"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if value / base >= 0.1 else f"{value / base:.3f}x"


# -- main -------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, state: Agents) -> None:
    started = time.perf_counter()
    log("starting two agents (one with a warm pool, one with --warm-per-shape 0)")
    warm_agent = state.start("warm")
    cold_agent = state.start("cold", "--warm-per-shape", "0")
    # The default warm pool: one kernel per GPU shape (H100 x1) and one CPU kernel.
    full = 2
    await wait_warm(warm_agent, full)
    if warm_gpu_kernels(cold_agent)[1] != 0:
        raise RuntimeError("the agent started with --warm-per-shape 0 keeps warm kernels")

    starts = await measure_starts(state, warm_agent, cold_agent, args.runs, full)

    paths = ExecPaths(state, warm_agent)
    await paths.start(full)
    rounds = max(1, min(8, args.iterations // 25))
    counts = [args.iterations // rounds + (r < args.iterations % rounds) for r in range(rounds)]
    await wait_quiet()
    log(f"execute round trip: {args.iterations} per path, in {rounds} interleaved rounds")
    rtt = await paths.rounds("1+1", counts, warmup=20)
    for series in rtt:
        series.check = "reply ok"
    await wait_quiet()
    log(f"IOPub: {IOPUB_MIB} MiB of stdout, {args.iopub_runs} runs per path")
    iopub = await paths.rounds(IOPUB_CODE, [1] * args.iopub_runs, warmup=2)
    for series in iopub:
        wrong = [n for n in series.outs if n != IOPUB_BYTES]
        if wrong:
            raise RuntimeError(f"{series.label}: got {wrong} bytes of stdout, not {IOPUB_BYTES}")
        series.check = f"all {IOPUB_BYTES} B arrived, every run"
    await paths.stop()
    elapsed = time.perf_counter() - started

    rows: list[Row] = []
    base = median(starts[0].samples)
    for series in starts:
        rows.append(
            Row("kernel ready", series.label, len(series.samples), ms(median(series.samples)),
                ms(p90(series.samples)), ratio(median(series.samples), base), "")
        )  # fmt: skip
    for row, series in zip(rows[2:], starts[2:], strict=True):
        met = median(series.samples) * 1e3 < TARGET_WARM_MS
        row.check = f"target < {TARGET_WARM_MS:.0f} ms: {'met' if met else 'MISSED'}"
    base = median(rtt[0].samples)
    for series in rtt:
        value = median(series.samples)
        check = series.check
        if series is not rtt[0]:
            ok = value / base <= TARGET_RTT_RATIO
            check += f"; target <= {TARGET_RTT_RATIO}x: {'met' if ok else 'MISSED'}"
        rows.append(
            Row("execute `1+1` round trip", series.label, len(series.samples), ms(value),
                ms(p90(series.samples)), ratio(value, base), check)
        )  # fmt: skip
    base = median(iopub[0].samples)
    for series in iopub:
        value = median(series.samples)
        rate = IOPUB_MIB / value
        rows.append(
            Row(f"IOPub {IOPUB_MIB} MiB stdout", series.label, len(series.samples),
                f"{value:.2f} s ({rate:.0f} MiB/s)", f"{p90(series.samples):.2f} s",
                f"{ratio(value, base)} time ({base / value:.2f}x rate)", series.check)
        )  # fmt: skip

    for line in run_lines(machine(), MEASURED, elapsed):
        print(line)
    if NOT_QUIET:
        print(
            f"warning: {len(NOT_QUIET)} waits for a quiet machine gave up: something else was "
            "busy on this machine, so these numbers are noisier than they should be"
        )
    print()
    for line in table(rows):
        print(line)
    print()
    print("Kernel ready, medians of its parts:")
    print()
    for series in starts:
        parts = ", ".join(f"{name} {ms(median(v))}" for name, v in series.parts.items())
        print(f"- {series.label}: {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="kernel starts per path (20)")
    parser.add_argument(
        "--iterations", type=int, default=400, help="execute round trips per path (400)"
    )
    parser.add_argument("--iopub-runs", type=int, default=5, help="20 MiB cells per path (5)")
    args = parser.parse_args()
    if min(args.runs, args.iterations, args.iopub_runs) < 1:
        parser.error("--runs, --iterations and --iopub-runs must be at least 1")

    run_main(
        "gpupool-bench-", Agents, lambda started: bench(args, started), "the agents and kernels"
    )


if __name__ == "__main__":
    main()
