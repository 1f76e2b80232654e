"""Load benchmark: many tenants' kernel starts and websockets at once, gpupool against stock
jupyter-kernel-gateway, in the same run.

Run from the repository root:

    .venv/bin/python bench/load.py [--tenants 10] [--kernels 64] [--sockets 1000]
                                   [--sockets-per-kernel 20] [--round-trips 5]

The same load is put on two systems, one after the other, on loopback:

- gpupool: one `gpupool gateway` and one `gpupool host` joined to it (`--fake-gpus H100:K` for K
  kernels, `--warm-per-shape 0` so that every start is cold as on the other side,
  `--no-isolate`), with `--tenants` tenants made through the admin API, each with its own token.
  Kernels are `python3-gpu-h100-x1`, one fake H100 each.
- jupyter-kernel-gateway 3.0.1, in its own virtualenv `bench/.venv-jkg` (made here when missing:
  its import name `kernel_gateway` is ours too), with one auth token, which every "tenant" uses;
  it has no tenants. Its `python3` kernelspec runs this Python's ipykernel, so both sides run
  the same kernels.

On each, in order:

1. RSS and open descriptors of the servers (gateway and host; JKG's one process) and of their
   kernels, before any load.
2. Kernel starts: `--kernels` kernels requested at once, spread round-robin over the tenants,
   each timed from its `POST /api/kernels` to its first kernel_info_reply over a websocket.
3. Websockets: `--sockets` websockets opened at once, `sockets / tenants` for each tenant, spread
   evenly over that tenant's kernels (at most `--sockets-per-kernel` on one kernel), each timed
   from the connect to the open socket.
4. Round trips: every open websocket sends `--round-trips` kernel_info_requests, one after the
   other, all websockets at once; each is timed to its kernel_info_reply. A request that gets
   no reply (a timeout, a closed socket) is counted as unanswered.
5. RSS and descriptors under load (every websocket still open), then every websocket closed and
   every kernel deleted at once, and RSS and descriptors after (once the kernels' processes
   are gone).

Every result is kept per tenant: the report shows the whole, then each tenant's p50, p99 and
errors, so that one tenant's slowness or failures show beside the others'. This client runs in
one Python process and raises its own RLIMIT_NOFILE; the servers are started with the limit
this script was started with. Every wait is bounded, and every kernel and process started is
stopped at the end, also on error or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tornado.httpclient import HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, websocket_connect

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from conftest import Gateway, HostAgent, free_port, start_gateway, start_host  # noqa: E402
from kernel_ws import V1, KernelSocket, ws_url  # noqa: E402

from bench.gateway import Http, Server, ms  # noqa: E402
from bench.harness import command_line, commit, describe_machine, log, run_main  # noqa: E402

GPU_SPEC = "python3-gpu-h100-x1"
JKG_VERSION = "3.0.1"
JKG_VENV = REPO / "bench" / ".venv-jkg"
JKG_SCRIPT = JKG_VENV / "bin" / "jupyter-kernelgateway"
START_TIMEOUT = 300.0  # seconds: the most one of the concurrent kernel starts may take
OPEN_TIMEOUT = 120.0  # seconds: the most one websocket may take to open
REPLY_TIMEOUT = 60.0  # seconds: the most one kernel_info round trip may take
SHUTDOWN_TIMEOUT = 120.0
MEASURED = ("kernel_gateway", "gpu_host", "bench/load.py", "tests/kernel_ws.py")


# -- small helpers ---------------------------------------------------------------------------


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); nan for no values."""
    if not values:
        return float("nan")
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def fms(seconds: float) -> str:
    return "n/a" if seconds != seconds else ms(seconds)  # nan: no sample


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text.replace("|", "/").replace("\n", " ")[:160]


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft descriptor limit to its hard one (the client holds every
    websocket); returns the limits it had."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


@contextlib.contextmanager
def nofile(limits: tuple[int, int]) -> Iterator[None]:
    """Processes started inside get `limits` (what this script was started with), not the
    client's raised limit."""
    raised = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, raised)


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            ppid = int(text[text.rfind(")") + 2 :].split()[1])
            children[ppid].append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    children, found, stack = _children(), [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Usage:
    """RSS (MiB) and open descriptors of one server process, and of all its descendants."""

    rss: float
    fds: int
    kernels: int
    kernels_rss: float

    @classmethod
    def of(cls, pid: int) -> Usage:
        kids = [p for p in descendants(pid) if rss_mib(p) > 0]
        return cls(rss_mib(pid), fds(pid), len(kids), sum(rss_mib(p) for p in kids))


# -- the systems under load -------------------------------------------------------------------


@dataclass
class System:
    name: str
    url: str
    tokens: list[str]  # one per tenant (the same token for all on jupyter-kernel-gateway)
    spec: str
    processes: dict[str, int]  # what it is -> pid
    kernels_of: str  # the process whose descendants are the kernels
    logs: dict[str, Path]


@dataclass
class Started:
    """Everything this bench started, so that it can all be stopped."""

    where: Path
    limits: tuple[int, int]
    http: Http = field(default_factory=Http)
    gateway: Gateway | None = None
    host: HostAgent | None = None
    jkg: subprocess.Popen[bytes] | None = None
    jkg_log: Path | None = None
    kernels: list[tuple[Server, str]] = field(default_factory=list)
    sockets: list[KernelSocket] = field(default_factory=list)

    def logs(self) -> list[tuple[str, Callable[[], str]]]:
        found: list[tuple[str, Callable[[], str]]] = []
        for proc in (self.gateway, self.host):
            if proc is not None:
                found.append((str(proc.log_path), proc.log))
        if self.jkg_log is not None:
            path = self.jkg_log
            found.append((str(path), lambda: path.read_text(errors="replace")[-4000:]))
        return found

    async def shut_down_kernels(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(Exception):
                sock.close()
        self.sockets.clear()
        if self.kernels:
            log(f"shutting down {len(self.kernels)} kernels left over")

        async def delete(server: Server, kernel_id: str) -> None:
            with contextlib.suppress(Exception):
                await self.http.call(server, "DELETE", f"/api/kernels/{kernel_id}", timeout=60)

        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(delete(s, k) for s, k in list(self.kernels))), 90
            )
        self.kernels.clear()

    async def stop_servers(self) -> None:
        for proc in (self.host, self.gateway):  # the host first: it stops its kernels
            if proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(proc.stop)
        self.host = self.gateway = None
        if self.jkg is not None:
            jkg = self.jkg
            self.jkg = None
            if jkg.poll() is None:
                jkg.terminate()
                try:
                    await asyncio.to_thread(jkg.wait, 30)
                except subprocess.TimeoutExpired:
                    jkg.kill()
                    await asyncio.to_thread(jkg.wait, 5)

    async def cleanup(self) -> None:
        await self.shut_down_kernels()
        await self.stop_servers()


async def start_gpupool(bench: Started, tenants: int, kernels: int) -> System:
    where = bench.where / "gpupool"
    (where / "gateway").mkdir(parents=True)
    (where / "host").mkdir()
    with nofile(bench.limits):
        gateway = await asyncio.to_thread(start_gateway, where / "gateway")
        bench.gateway = gateway
        host = await asyncio.to_thread(
            start_host, where / "host", "--fake-gpus", f"H100:{kernels}", "--warm-per-shape",
            "0", "--no-isolate", "--gateway", gateway.url, f"--join-token={gateway.join_token}",
            "--heartbeat-seconds", "2",
        )  # fmt: skip
        bench.host = host
    tokens = [
        await asyncio.to_thread(gateway.tenant, f"tenant-{i}") for i in range(tenants)
    ]  # fmt: skip
    deadline = time.monotonic() + 60
    probe = Server("gpupool", gateway.url, tokens[0])
    while True:
        status, gpus = await bench.http.call(probe, "GET", "/api/gpus")
        totals = {g["gpu_type"]: g["total"] for g in gpus} if status == 200 else {}
        if totals.get("H100") == kernels:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the host did not join the gateway: {status} {gpus}")
        await asyncio.sleep(0.1)
    return System(
        name="gpupool",
        url=gateway.url,
        tokens=tokens,
        spec=GPU_SPEC,
        processes={"gpupool gateway": gateway.proc.pid, "gpupool host": host.proc.pid},
        kernels_of="gpupool host",
        logs={"gpupool gateway": gateway.log_path, "gpupool host": host.log_path},
    )


def ensure_jkg() -> None:
    """Make bench/.venv-jkg with jupyter-kernel-gateway, from PyPI, unless it is there."""
    if JKG_SCRIPT.exists():
        return
    log(f"making {JKG_VENV.relative_to(REPO)} with jupyter-kernel-gateway {JKG_VERSION}")
    subprocess.run([sys.executable, "-m", "venv", str(JKG_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(JKG_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
         f"jupyter_kernel_gateway=={JKG_VERSION}"],
        check=True, timeout=600,
    )  # fmt: skip


def jkg_version() -> str:
    try:
        return subprocess.run(
            [str(JKG_VENV / "bin" / "python"), "-c",
             "from importlib.metadata import version; print(version('jupyter_kernel_gateway'))"],
            capture_output=True, text=True, timeout=60, check=True, cwd="/",
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def spawn(
    command: list[str], env: dict[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def wait_jkg(proc: subprocess.Popen[bytes], url: str, token: str, log_path: Path) -> None:
    """Until jupyter-kernel-gateway lists the `python3` kernelspec, at most 90 s."""
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter-kernel-gateway exited: {log_path.read_text()}")
        request = urllib.request.Request(
            f"{url}/api/kernelspecs", headers={"Authorization": f"token {token}"}
        )
        with contextlib.suppress(OSError, ValueError, KeyError):
            with urllib.request.urlopen(request, timeout=5) as response:
                if "python3" in json.load(response)["kernelspecs"]:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"jupyter-kernel-gateway did not answer within 90 s: {log_path}")
        time.sleep(0.2)


async def start_jkg(bench: Started, tenants: int) -> System:
    """Stock jupyter-kernel-gateway on loopback with one auth token; its `python3` kernelspec
    runs this Python's ipykernel. Run outside the repository and without PYTHONPATH, so that
    it imports its own `kernel_gateway`."""
    await asyncio.to_thread(ensure_jkg)
    where = bench.where / "jkg"
    spec = where / "share" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python",
        })
    )  # fmt: skip
    token = secrets.token_hex(16)
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("GPUPOOL_", "JUPYTER_")) and k != "PYTHONPATH"
    }  # fmt: skip
    env.update(
        JUPYTER_PATH=str(where / "share"), JUPYTER_RUNTIME_DIR=str(where / "runtime"),
        JUPYTER_CONFIG_DIR=str(where / "config"), JUPYTER_DATA_DIR=str(where / "data"),
        KG_AUTH_TOKEN=token,  # its auth token, off the command line
    )  # fmt: skip
    bench.jkg_log = where / "jkg.log"
    port = free_port()
    command = [
        str(JKG_SCRIPT),
        "--KernelGatewayApp.ip=127.0.0.1",
        f"--KernelGatewayApp.port={port}",
    ]
    with nofile(bench.limits):
        bench.jkg = await asyncio.to_thread(spawn, command, env, where, bench.jkg_log)
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_jkg, bench.jkg, url, token, bench.jkg_log)
    return System(
        name=f"jupyter-kernel-gateway {jkg_version()}",
        url=url,
        tokens=[token] * tenants,
        spec="python3",
        processes={"jupyter-kernel-gateway": bench.jkg.pid},
        kernels_of="jupyter-kernel-gateway",
        logs={"jupyter-kernel-gateway": bench.jkg_log},
    )


# -- the load ---------------------------------------------------------------------------------


@dataclass
class TenantResult:
    starts: list[float] = field(default_factory=list)
    opens: list[float] = field(default_factory=list)
    rtts: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)  # each websocket's first round trip
    errors: Counter[str] = field(default_factory=Counter)
    kernels: int = 0
    sockets: int = 0
    planned: int = 0  # round trips planned
    unanswered: int = 0


@dataclass
class Result:
    system: System
    tenants: list[TenantResult]
    usage: dict[str, dict[str, Usage]]  # when -> process -> usage
    start_wall: float = 0.0
    open_wall: float = 0.0
    rtt_wall: float = 0.0
    shutdown: list[float] = field(default_factory=list)
    shutdown_errors: Counter[str] = field(default_factory=Counter)
    protocols: Counter[str] = field(default_factory=Counter)
    log_problems: dict[str, str] = field(default_factory=dict)

    def all(self, attr: str) -> list[float]:
        return [v for t in self.tenants for v in getattr(t, attr)]

    def errors(self, prefix: str) -> int:
        return sum(n for t in self.tenants for e, n in t.errors.items() if e.startswith(prefix))


def usage(system: System) -> dict[str, Usage]:
    return {what: Usage.of(pid) for what, pid in system.processes.items()}


async def open_socket(server: Server, kernel_id: str) -> KernelSocket:
    """A kernel websocket (v1 asked for), with this bench's connect and open timeouts."""
    request = HTTPRequest(
        ws_url(server.url, kernel_id) + f"?session_id={secrets.token_hex(16)}",
        headers={"Authorization": f"token {server.token}"},
        connect_timeout=OPEN_TIMEOUT,
        request_timeout=OPEN_TIMEOUT,
    )
    conn = await asyncio.wait_for(
        websocket_connect(request, subprotocols=[V1], max_message_size=64 << 20), OPEN_TIMEOUT
    )
    return KernelSocket(conn, conn.selected_subprotocol)


async def kernel_info(sock: KernelSocket, timeout: float) -> None:
    """One kernel_info round trip; a closed websocket raises ConnectionError with its code."""
    deadline = time.monotonic() + timeout
    try:
        msg_id = await sock.send("shell", "kernel_info_request", {})
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no kernel_info_reply within {timeout:.0f} s")
            msg = await sock.recv(left)
            if (
                msg["msg_type"] == "kernel_info_reply"
                and msg["parent_header"].get("msg_id") == msg_id
            ):
                return
    except (ConnectionError, WebSocketClosedError, StreamClosedError):
        code, reason = sock.conn.close_code, sock.conn.close_reason
        raise ConnectionError(f"the websocket closed: {code} {reason or ''}".strip()) from None


async def run_load(bench: Started, system: System, args: argparse.Namespace) -> Result:
    result = Result(system, [TenantResult() for _ in system.tokens], {})
    servers = [Server(system.name, system.url, token) for token in system.tokens]
    n_tenants = len(servers)
    result.usage["before"] = usage(system)

    # 1. concurrent kernel starts, round-robin over the tenants
    kernels: list[list[str]] = [[] for _ in servers]

    async def start_one(tenant: int) -> None:
        server, mine = servers[tenant], result.tenants[tenant]
        t0 = time.perf_counter()
        try:
            status, body = await bench.http.call(
                server, "POST", "/api/kernels", {"name": system.spec}, START_TIMEOUT
            )
            if status != 201:
                raise RuntimeError(f"POST /api/kernels answered {status}: {str(body)[:100]}")
            kernel_id = str(body["id"])
            bench.kernels.append((server, kernel_id))
            sock = await open_socket(server, kernel_id)
            try:
                left = START_TIMEOUT - (time.perf_counter() - t0)
                await kernel_info(sock, max(left, 1.0))
            finally:
                sock.close()
            mine.starts.append(time.perf_counter() - t0)
            kernels[tenant].append(kernel_id)
        except Exception as error:
            mine.errors[f"start: {describe(error)}"] += 1

    log(f"{system.name}: {args.kernels} kernel starts at once, over {n_tenants} tenants")
    t0 = time.perf_counter()
    await asyncio.gather(*(start_one(i % n_tenants) for i in range(args.kernels)))
    result.start_wall = time.perf_counter() - t0
    started = sum(len(k) for k in kernels)
    log(f"{system.name}: {started}/{args.kernels} kernels ready in {result.start_wall:.1f} s")
    for tenant, ids in enumerate(kernels):
        result.tenants[tenant].kernels = len(ids)

    # 2. websockets, each tenant's share spread evenly over its kernels
    plan: list[tuple[int, str]] = []
    for tenant in range(n_tenants):
        share = args.sockets // n_tenants + (tenant < args.sockets % n_tenants)
        ids = kernels[tenant]
        if not ids:
            result.tenants[tenant].errors["open: no kernel of the tenant started"] += share
            result.tenants[tenant].planned += share * args.round_trips
            continue
        for index in range(share):
            plan.append((tenant, ids[index % len(ids)]))
        result.tenants[tenant].planned += share * args.round_trips
    per_kernel = Counter(kernel_id for _, kernel_id in plan)
    most = max(per_kernel.values(), default=0)
    if most > args.sockets_per_kernel:
        log(f"{system.name}: {most} websockets on one kernel (some kernels did not start)")
    sockets: list[tuple[int, KernelSocket]] = []

    async def open_one(tenant: int, kernel_id: str) -> None:
        mine = result.tenants[tenant]
        t0 = time.perf_counter()
        try:
            sock = await open_socket(servers[tenant], kernel_id)
        except Exception as error:
            mine.errors[f"open: {describe(error)}"] += 1
            return
        mine.opens.append(time.perf_counter() - t0)
        mine.sockets += 1
        result.protocols[sock.protocol or "legacy JSON"] += 1
        bench.sockets.append(sock)
        sockets.append((tenant, sock))

    log(f"{system.name}: opening {len(plan)} websockets at once ({most} at most on one kernel)")
    t0 = time.perf_counter()
    await asyncio.gather(*(open_one(tenant, kernel_id) for tenant, kernel_id in plan))
    result.open_wall = time.perf_counter() - t0
    log(f"{system.name}: {len(sockets)}/{len(plan)} websockets open in {result.open_wall:.1f} s")

    # 3. kernel_info round trips on every websocket at once
    async def round_trips(tenant: int, sock: KernelSocket) -> None:
        mine = result.tenants[tenant]
        for done in range(args.round_trips):
            t0 = time.perf_counter()
            try:
                await kernel_info(sock, REPLY_TIMEOUT)
            except Exception as error:
                mine.errors[f"round trip: {describe(error)}"] += 1
                mine.unanswered += args.round_trips - done
                return
            mine.rtts.append(time.perf_counter() - t0)
            if done == 0:
                mine.firsts.append(mine.rtts[-1])

    log(f"{system.name}: {args.round_trips} kernel_info round trips on each websocket")
    t0 = time.perf_counter()
    await asyncio.gather(*(round_trips(tenant, sock) for tenant, sock in sockets))
    result.rtt_wall = time.perf_counter() - t0
    for tenant in result.tenants:  # round trips never sent: their websocket did not open
        tenant.unanswered = tenant.planned - len(tenant.rtts)
    answered = len(result.all("rtts"))
    planned = sum(t.planned for t in result.tenants)
    log(f"{system.name}: {answered}/{planned} round trips answered in {result.rtt_wall:.1f} s")
    result.usage["under load"] = usage(system)

    # 4. everything closed and deleted at once
    for _, sock in sockets:
        sock.close()
    bench.sockets.clear()

    async def delete(server: Server, kernel_id: str) -> None:
        t0 = time.perf_counter()
        try:
            status, body = await bench.http.call(
                server, "DELETE", f"/api/kernels/{kernel_id}", timeout=SHUTDOWN_TIMEOUT
            )
            if status != 204:
                raise RuntimeError(f"DELETE answered {status}: {str(body)[:100]}")
            result.shutdown.append(time.perf_counter() - t0)
        except Exception as error:
            result.shutdown_errors[describe(error)] += 1

    await asyncio.gather(
        *(delete(servers[t], k) for t, ids in enumerate(kernels) for k in ids)
    )  # fmt: skip
    bench.kernels.clear()
    deadline = time.monotonic() + 60
    kernel_parent = system.processes[system.kernels_of]
    while time.monotonic() < deadline:  # until the kernels' processes are gone
        if not Usage.of(kernel_parent).kernels:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # the servers finish closing what the kernels left
    result.usage["after"] = usage(system)
    for what, path in system.logs.items():
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace")
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                (args.logs / f"{what.replace(' ', '-')}.log").write_text(text)
            emfile = text.count("Too many open files")
            result.log_problems[what] = f"{text.count('Traceback')} / {emfile}"
    return result


# -- reporting ---------------------------------------------------------------------------------


def machine() -> str:
    return describe_machine(("jupyter_server", "jupyter_client", "ipykernel", "tornado", "pyzmq"))


def measured_from() -> Path:
    """Where the servers started here import gpu_host and kernel_gateway from: the first
    PYTHONPATH entry that has them, else this checkout."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and (Path(entry) / "gpu_host").is_dir():
            return Path(entry).resolve()
    return REPO


def first_errors(errors: Counter[str], prefix: str = "") -> str:
    shown = [(e, n) for e, n in errors.most_common() if e.startswith(prefix)][:2]
    return "; ".join(f"{n}x {e[len(prefix) :]}" for e, n in shown)


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: list[Result], args: argparse.Namespace, elapsed: float) -> None:
    print(f"command: `{command_line()}`")
    print(f"machine: {machine()}")
    print(f"commit: {commit(MEASURED)}")
    if measured_from() != REPO:
        print(f"gpupool's code measured: from {measured_from()} (PYTHONPATH), not this checkout")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"took: {elapsed:.0f} s")
    for r in results:
        protocols = ", ".join(f"{n} {p}" for p, n in r.protocols.most_common())
        print(f"websockets of {r.system.name} (v1 asked for): {protocols or 'none opened'}")
    print()
    print("| measurement | system | n | p50 | p99 | max | errors | check |")
    print("|---|---|--:|--:|--:|--:|--:|---|")
    for r in results:
        name = r.system.name
        starts, opens, rtts = r.all("starts"), r.all("opens"), r.all("rtts")
        errors = r.errors("start")
        merged: Counter[str] = sum((t.errors for t in r.tenants), Counter())
        check = f"{len(starts)}/{args.kernels} ready, all in {r.start_wall:.2f} s"
        if errors:
            check += f"; {first_errors(merged, 'start: ')}"
        print(
            f"| {args.kernels} kernel starts at once, POST to first kernel_info_reply | {name} | "
            f"{len(starts)} | {fms(pct(starts, 50))} | {fms(pct(starts, 99))} | "
            f"{fms(max(starts, default=float('nan')))} | {errors} | {check} |"
        )
        planned_sockets = sum(t.sockets for t in r.tenants) + r.errors("open")
        errors = r.errors("open")
        check = f"{len(opens)}/{planned_sockets} open, all in {r.open_wall:.2f} s"
        if errors:
            check += f"; {first_errors(merged, 'open: ')}"
        print(
            f"| {args.sockets} websockets opened at once, connect to open | {name} | {len(opens)} "
            f"| {fms(pct(opens, 50))} | {fms(pct(opens, 99))} | "
            f"{fms(max(opens, default=float('nan')))} | {errors} | {check} |"
        )
        planned = sum(t.planned for t in r.tenants)
        lost = sum(t.unanswered for t in r.tenants)
        errors = r.errors("round trip")
        check = (
            f"{len(rtts)}/{planned} answered in {r.rtt_wall:.2f} s; "
            f"target nothing lost: {met(lost == 0)}"
        )
        if errors:
            check += f"; {first_errors(merged, 'round trip: ')}"
        print(
            f"| kernel_info round trip, {args.round_trips} per websocket, every websocket at "
            f"once | {name} | {len(rtts)} | {fms(pct(rtts, 50))} | {fms(pct(rtts, 99))} | "
            f"{fms(max(rtts, default=float('nan')))} | {errors} | {check} |"
        )
        firsts = r.all("firsts")
        print(
            f"| of which the first on each websocket | {name} | {len(firsts)} | "
            f"{fms(pct(firsts, 50))} | {fms(pct(firsts, 99))} | "
            f"{fms(max(firsts, default=float('nan')))} | | |"
        )
        errors = sum(r.shutdown_errors.values())
        check = f"{len(r.shutdown)} deleted"
        if errors:
            check += f"; {first_errors(r.shutdown_errors)}"
        print(
            f"| kernel shutdowns at once, DELETE to 204 | {name} | {len(r.shutdown)} | "
            f"{fms(pct(r.shutdown, 50))} | {fms(pct(r.shutdown, 99))} | "
            f"{fms(max(r.shutdown, default=float('nan')))} | {errors} | {check} |"
        )
    print()
    print(
        "| system | tenant | kernels | websockets | start p50 / p99 | open p50 / p99 | "
        "round trip p50 / p99 | errors | unanswered |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        for index, t in enumerate(r.tenants):
            print(
                f"| {r.system.name} | {index} | {t.kernels} | {t.sockets} | "
                f"{fms(pct(t.starts, 50))} / {fms(pct(t.starts, 99))} | "
                f"{fms(pct(t.opens, 50))} / {fms(pct(t.opens, 99))} | "
                f"{fms(pct(t.rtts, 50))} / {fms(pct(t.rtts, 99))} | "
                f"{sum(t.errors.values())} | {t.unanswered} |"
            )
    print()
    print(
        "| system | process | RSS before | RSS under load | RSS after | fds before / under "
        "load / after | its log: tracebacks / 'Too many open files' |"
    )
    print("|---|---|--:|--:|--:|--:|--:|")
    for r in results:
        logs = r.log_problems
        for what in r.system.processes:
            u = [r.usage[when][what] for when in ("before", "under load", "after")]
            problems = logs.get(what, "")
            print(
                f"| {r.system.name} | {what} | {u[0].rss:.0f} MiB | {u[1].rss:.0f} MiB | "
                f"{u[2].rss:.0f} MiB | {u[0].fds} / {u[1].fds} / {u[2].fds} | {problems} |"
            )
        k = [r.usage[when][r.system.kernels_of] for when in ("before", "under load", "after")]
        print(
            f"| {r.system.name} | its kernels, all together ({k[0].kernels} / {k[1].kernels} / "
            f"{k[2].kernels} processes) | {k[0].kernels_rss:.0f} MiB | "
            f"{k[1].kernels_rss:.0f} MiB | {k[2].kernels_rss:.0f} MiB | | |"
        )
    print()
    for r in results:
        p99s = [pct(t.rtts, 99) for t in r.tenants if t.rtts]
        failing = [i for i, t in enumerate(r.tenants) if t.errors or t.unanswered]
        spread = f"{max(p99s) / min(p99s):.2f}x" if p99s and min(p99s) > 0 else "n/a"
        low, high = min(p99s, default=float("nan")), max(p99s, default=float("nan"))
        print(
            f"- {r.system.name}: round-trip p99 per tenant from {fms(low)} to {fms(high)} "
            f"({spread}); tenants with errors or "
            f"unanswered requests: {', '.join(map(str, failing)) or 'none'}"
        )


# -- main -------------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace, bench: Started) -> None:
    started = time.perf_counter()
    results: list[Result] = []
    for system in args.systems:
        if system == "gpupool":
            log(f"starting a gpupool gateway and host with {args.kernels} fake H100s")
            target = await start_gpupool(bench, args.tenants, args.kernels)
        else:
            log("starting jupyter-kernel-gateway")
            target = await start_jkg(bench, args.tenants)
        results.append(await run_load(bench, target, args))
        await bench.cleanup()
    report(results, args, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=10, help="tenants (10)")
    parser.add_argument("--kernels", type=int, default=64, help="kernels started at once (64)")
    parser.add_argument("--sockets", type=int, default=1000, help="websockets in all (1000)")
    parser.add_argument(
        "--sockets-per-kernel", type=int, default=20,
        help="the most websockets on one kernel (20); sockets are spread evenly under it",
    )  # fmt: skip
    parser.add_argument(
        "--round-trips", type=int, default=5, help="kernel_info round trips per websocket (5)"
    )
    parser.add_argument(
        "--systems", default="gpupool,jkg",
        help="what to load, in order: gpupool, jkg or both (gpupool,jkg)",
    )  # fmt: skip
    parser.add_argument(
        "--logs", type=Path, help="a folder to copy the servers' logs into, for reading after"
    )
    parser.add_argument("--limit", type=float, default=1800, help="seconds for the run (1800)")
    args = parser.parse_args()
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - {"gpupool", "jkg"}:
        parser.error("--systems takes gpupool, jkg or both, separated by a comma")
    if min(args.tenants, args.kernels, args.sockets, args.sockets_per_kernel) < 1:
        parser.error("--tenants, --kernels, --sockets and --sockets-per-kernel must be at least 1")
    if args.round_trips < 1:
        parser.error("--round-trips must be at least 1")
    if args.kernels < args.tenants:
        parser.error("--kernels must be at least --tenants: each tenant needs a kernel")
    fewest = args.kernels // args.tenants  # kernels of the tenants with fewest
    most_sockets = -(-args.sockets // args.tenants)
    if most_sockets > fewest * args.sockets_per_kernel:
        parser.error(
            f"{most_sockets} websockets for a tenant with {fewest} kernels is more than "
            f"--sockets-per-kernel {args.sockets_per_kernel} each: raise --kernels or "
            "--sockets-per-kernel, or lower --sockets"
        )

    limits = raise_nofile()
    if limits[1] < args.sockets + 256:
        log(f"the descriptor limit ({limits[1]}) is low for {args.sockets} websockets")
    run_main(
        "gpupool-bench-load-",
        lambda where: Started(where, limits),
        lambda started: run_bench(args, started),
        "the servers and kernels",
        limit=args.limit,
    )


if __name__ == "__main__":
    main()
