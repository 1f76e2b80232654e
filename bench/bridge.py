"""Pool kernel bridge benchmark: what the local bridge of `gpupool-provisioner` adds to a `1+1`
round trip, against the gateway's kernel websocket directly.

Run from the repository root:

    .venv/bin/python bench/bridge.py [--iterations N]

One `gpupool up --no-lab` (a gateway and a host with two fake H100s) is started in a scratch
folder, `gpupool kernelspec sync` writes the pool kernelspecs into a scratch Jupyter data folder,
and jupyter_client's `AsyncKernelManager` starts `python3-gpu-h100-x1` through the provisioner.
The same pool kernel is then timed, in interleaved rounds, over:

- the gateway websocket directly (v1 binary protocol, `websockets` asyncio client);
- the bridge: jupyter_client's `AsyncKernelClient` over ZMQ to the bridge, which relays to its
  own websocket at the gateway;
- for reference, a local ipykernel over ZMQ with the same client (no gateway, no host).

A round trip is an execute_request of `1+1` until both its execute_reply and its idle status
have arrived. "Added by the bridge" is the bridge's median minus the websocket's median; it
includes jupyter_client's own client work (signing, serialising), so it overstates the bridge.
Target: at most 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from harness import REPO, commit, log, run_main
from jupyter_client.manager import AsyncKernelManager
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(REPO))
from gpupool.wire import V1_PROTOCOL, v1_message, v1_split
from jupyter_ext.gateway_api import GatewayApi
from jupyter_ext.kernel_bridge import wait_until_running
from jupyter_ext.kernelspecs import sync_kernelspecs

SHAPE = "python3-gpu-h100-x1"
BARE = "bridge, bare ZMQ client (the websocket client's work, over ZMQ)"
CLIENT = "bridge, jupyter_client's AsyncKernelClient"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(self, where: Path) -> None:
        self.log_path = where / "up.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool.cli", "up", "--no-lab",
             "--port", str(free_port()), "--host-port", str(free_port()),
             "--fake-gpus", "H100:2", "--state-dir", str(where / "state")],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, cwd=where,
            env={k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")},
        )  # fmt: skip
        self.url = self.token = ""
        deadline = time.monotonic() + 90
        while not (self.url and self.token):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gpupool up did not start: {self.log_path.read_text()}")
            for line in self.log_path.read_text().splitlines():
                key, _, value = line.partition(": ")
                if key == "gateway":
                    self.url = value.strip()
                elif key == "token":
                    self.token = value.strip()
            time.sleep(0.1)
        os.environ.update({"GPUPOOL_URL": self.url, "GPUPOOL_TOKEN": self.token,
                           "JUPYTER_DATA_DIR": str(where / "jupyter-data")})  # fmt: skip
        self.managers: list[AsyncKernelManager] = []

    async def cleanup(self) -> None:
        for km in self.managers:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def logs(self) -> list[tuple[str, Any]]:
        return [("gpupool up", self.log_path.read_text)]


def request(session: str) -> tuple[str, list[bytes]]:
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": session,
              "username": "bench", "version": "5.3",
              "date": datetime.now(timezone.utc).isoformat()}  # fmt: skip
    content = {"code": "1+1", "silent": False, "store_history": False, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": True}  # fmt: skip
    return msg_id, [json.dumps(x).encode() for x in (header, {}, {}, content)]


async def ws_round_trip(ws: ClientConnection, session: str) -> float:
    msg_id, parts = request(session)
    started = time.perf_counter()
    await ws.send(v1_message("shell", parts))
    replied = idle = False
    while not (replied and idle):
        _, got = v1_split(await ws.recv())
        parent = json.loads(bytes(got[1]) or b"{}")
        if parent.get("msg_id") != msg_id:
            continue
        msg_type = json.loads(bytes(got[0]))["msg_type"]
        replied = replied or msg_type == "execute_reply"
        idle = idle or (msg_type == "status" and json.loads(bytes(got[3]))["execution_state"]
                        == "idle")  # fmt: skip
    return time.perf_counter() - started


async def zmq_round_trip(kc: Any) -> float:
    started = time.perf_counter()
    msg_id = kc.execute("1+1")
    replied = idle = False
    while not (replied and idle):
        if not replied:
            reply = await kc.get_shell_msg(timeout=10)
            replied = reply["parent_header"].get("msg_id") == msg_id
        if not idle:
            msg = await kc.get_iopub_msg(timeout=10)
            idle = (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle")  # fmt: skip
    return time.perf_counter() - started


class BareZmqClient:
    """The websocket client's counterpart over ZMQ: raw sockets, signs what it sends and reads
    only the parent header and type of what comes back (as `ws_round_trip` does), so that
    the two paths differ by the bridge alone, not by jupyter_client's client work."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.ctx: zmq.asyncio.Context = zmq.asyncio.Context()
        url = f"tcp://{info['ip']}:"
        self.shell = self.ctx.socket(zmq.DEALER)
        self.shell.connect(url + str(info["shell_port"]))
        self.iopub = self.ctx.socket(zmq.SUB)
        self.iopub.subscribe(b"")
        self.iopub.connect(url + str(info["iopub_port"]))
        key = info["key"].encode() if isinstance(info["key"], str) else info["key"]
        self.auth = hmac.new(key, digestmod=hashlib.sha256)
        self.session = uuid.uuid4().hex

    async def round_trip(self) -> float:
        msg_id, parts = request(self.session)
        check = self.auth.copy()
        for part in parts:
            check.update(part)
        started = time.perf_counter()
        await self.shell.send_multipart([b"<IDS|MSG>", check.hexdigest().encode(), *parts])
        replied = idle = False
        while not (replied and idle):
            if not replied:
                frames = await self.shell.recv_multipart()
                replied = json.loads(frames[3]).get("msg_id") == msg_id
            if not idle:
                frames = await self.iopub.recv_multipart()
                idle = (json.loads(frames[4]).get("msg_id") == msg_id
                        and json.loads(frames[3])["msg_type"] == "status"
                        and json.loads(frames[6])["execution_state"] == "idle")  # fmt: skip
        return time.perf_counter() - started

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_per_round_trip(km: AsyncKernelManager, kc: Any, iterations: int) -> float:
    """CPU seconds the process behind `km` (the bridge, or a local ipykernel) spends per round
    trip, measured alone: what it costs whatever else this machine runs."""
    pid = km.provisioner.pid  # type: ignore[union-attr]
    before = cpu_seconds(pid)
    for _ in range(iterations):
        await zmq_round_trip(kc)
    return (cpu_seconds(pid) - before) / iterations


async def ready(km: AsyncKernelManager) -> Any:
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return kc


def row(name: str, times: list[float], base: float) -> str:
    ms = sorted(t * 1000 for t in times)
    median, p90 = statistics.median(ms), ms[int(len(ms) * 0.9)]
    return f"| {name} | {len(ms)} | {median:.2f} ms | {p90:.2f} ms | {median / base:.2f}x |"


async def body(stack: Stack, iterations: int) -> None:
    names = sync_kernelspecs(stack.url, stack.token)
    log(f"kernelspecs: {', '.join(names)}")
    pool = AsyncKernelManager(kernel_name=SHAPE)
    local = AsyncKernelManager(kernel_name="python3")
    stack.managers += [pool, local]
    await pool.start_kernel()
    await local.start_kernel()
    pool_kc, local_kc = await ready(pool), await ready(local)
    # The websocket path gets a pool kernel of its own, so that neither path relays the
    # other's IOPub (a kernel's IOPub goes to every websocket it has).
    api = GatewayApi(stack.url, stack.token)
    kernel_id = str(api.start_kernel(SHAPE)["id"])
    wait_until_running(api, kernel_id, 60, log)
    url = stack.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
    session = uuid.uuid4().hex
    async with connect(f"{url}?session_id={session}", subprotocols=[V1_PROTOCOL],  # type: ignore[list-item]
                       additional_headers={"Authorization": f"token {stack.token}"},
                       compression=None, proxy=None) as ws:  # fmt: skip
        assert ws.subprotocol == V1_PROTOCOL
        bare = BareZmqClient(pool.get_connection_info(session=False))
        await asyncio.sleep(0.5)  # the SUB socket's subscription reaches the bridge
        paths = {"gateway websocket, direct (baseline)": lambda: ws_round_trip(ws, session),
                 BARE: bare.round_trip,
                 CLIENT: lambda: zmq_round_trip(pool_kc),
                 "local ipykernel, jupyter_client over ZMQ (reference)": lambda: zmq_round_trip(
                     local_kc)}  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(20):  # warm up every path
            for measure in paths.values():
                await measure()
        for _ in range(iterations):
            for name, measure in paths.items():
                times[name].append(await measure())
        bare.close()
        cpu = await cpu_per_round_trip(pool, pool_kc, iterations)
        kernel_cpu = await cpu_per_round_trip(local, local_kc, iterations)
    api.shutdown(kernel_id)
    pool_kc.stop_channels()
    local_kc.stop_channels()
    base = statistics.median(times["gateway websocket, direct (baseline)"]) * 1000
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; Python {platform.python_version()}"
    )
    print(f"commit: {commit(['jupyter_ext', 'bench/bridge.py'])}; date: "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")  # fmt: skip
    print("\n| execute `1+1` round trip | n | median | p90 | vs websocket |")
    print("|---|---|---|---|---|")
    for name, measured in times.items():
        print(row(name, measured, base))
    bare_ms = statistics.median(times[BARE]) * 1000
    client_ms = statistics.median(times[CLIENT]) * 1000
    print(
        f"\nadded by the bridge (median, the same bare client work on both paths): "
        f"{bare_ms - base:.2f} ms; target <= 1 ms: "
        f"{'met' if bare_ms - base <= 1.0 else 'NOT met'}"
    )
    print(
        f"with jupyter_client's AsyncKernelClient on the bridge's side: {client_ms - base:.2f} ms"
    )
    print(f"CPU per round trip ({iterations} alone, /proc/PID/stat): the bridge process "
          f"{cpu * 1000:.2f} ms, a local ipykernel {kernel_cpu * 1000:.2f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    run_main("gpupool-bench-bridge-", Stack, lambda s: body(s, args.iterations), "the stack")


if __name__ == "__main__":
    main()
