"""Idle benchmark: when billing stops after the idle deadline, and suspend and resume times.

Run from the repository root:

    .venv/bin/python bench/idle.py [--kernels 50] [--stagger 0] [--repeats 3] [--no-gib]

One `gpupool gateway` on loopback, with one `gpupool host` joined to it (56 fake H100s,
`--no-isolate`, heartbeats every second, its default warm pool of one kernel per GPU shape).
Every kernel is `python3-gpu-h100-x1` with `KERNEL_IDLE_TIMEOUT=3` in the body of its
`POST /api/kernels`, so the gateway suspends it 3 s after its last activity.

1. Billing end against the deadline: `--kernels` kernels are requested at once (or one every
   `--stagger` seconds). As each is running, its websocket is opened, one small cell (`x = 1`)
   runs, and its model is read. The deadline is the model's `last_activity` plus its
   `idle_timeout` (what the idle watch acts on), as the models showed it before it passed (they
   are polled every 0.5 s, all in one `GET /api/kernels`, until every kernel is `suspended`);
   `gpupool.idle_deadline` as read right after the cell is compared with it. Then each
   kernel's ledger (`GET /api/usage?kernel=`) gives the `end` of its interval that ended
   `suspended`. Target: every interval closed within 1 s of its deadline.
2. Suspend and resume of a namespace of 1 MiB, 100 MiB and 1 GiB (a numpy uint8 array `a` of
   that size, made in the kernel by a cell), `--repeats` times each, one kernel at a time:
   - suspend: from the idle deadline to the interval's end (billing stops only once the host
     has written the checkpoint), to the checkpoint file's last write (its mtime, in the
     tenant's folder on the host), and to the model first showing `suspended` (polled every
     20 ms); and the checkpoint's size on disk.
   - resume: once the host's warm pool is full again and the bench's processes are quiet,
     `print(len(a))` is sent on the suspended kernel's still open websocket; timed to the
     arrival of its output (which must be the array's length), and to the start of the new
     ledger interval (the warm GPU taken, before the restore).
   Target: a 100 MiB namespace resumes on a warm GPU in under 2 s.

Every wait is bounded, and every kernel and process started is stopped at the end, also on
error or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway import (  # noqa: E402
    NOT_QUIET,
    Http,
    Server,
    log,
    median,
    p90,
    wait_quiet,
)
from bench.harness import describe_machine, run_lines, run_main  # noqa: E402
from tests.conftest import Gateway, HostAgent, start_gateway, start_host  # noqa: E402
from tests.kernel_ws import V1, KernelSocket  # noqa: E402

SPEC = "python3-gpu-h100-x1"
GPUS = 56
IDLE_TIMEOUT = "3"
ENV = {"KERNEL_IDLE_TIMEOUT": IDLE_TIMEOUT}
SIZES = (("1 MiB", 1 << 20), ("100 MiB", 100 << 20), ("1 GiB", 1 << 30))
TIMEOUT = 60.0  # seconds: the most any single step may take
START_TIMEOUT = 180.0  # seconds: the most one of many concurrent starts may take
CLOSE_TARGET = 1.0  # seconds: interval end after the deadline
RESUME_TARGET = 2.0  # seconds: resume of 100 MiB on a warm GPU
MEASURED = ("kernel_gateway", "gpu_host", "bench/idle.py", "bench/gateway.py", "tests/kernel_ws.py")


def stamp(iso: str) -> float:
    when = datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


def secs(value: float) -> str:
    """Seconds as people read them: ms below 1 s, signed when `value` is a difference."""
    if abs(value) < 1:
        return f"{value * 1000:.0f} ms" if abs(value) >= 0.1 else f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def size(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


# -- everything started, so that it can all be stopped ----------------------------------------


@dataclass
class Bench:
    where: Path
    http: Http = field(default_factory=Http)
    gateway: Gateway | None = None
    host: HostAgent | None = None
    server: Server = field(default_factory=lambda: Server("gateway", "", ""))
    kernels: list[str] = field(default_factory=list)
    sockets: list[KernelSocket] = field(default_factory=list)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        status, reply = await self.http.call(self.server, method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path} answered {status}: {reply}")
        return reply

    async def create(self) -> str:
        body = {"name": SPEC, "env": ENV}
        status, reply = await self.http.call(
            self.server, "POST", "/api/kernels", body, START_TIMEOUT
        )
        if status != 201:
            raise RuntimeError(f"POST /api/kernels answered {status}: {reply}")
        self.kernels.append(reply["id"])
        return str(reply["id"])

    async def delete(self, kernel_id: str) -> None:
        with contextlib.suppress(ValueError):
            self.kernels.remove(kernel_id)
        await self.call("DELETE", f"/api/kernels/{kernel_id}")

    async def open(self, kernel_id: str) -> KernelSocket:
        sock = await asyncio.wait_for(
            KernelSocket.open(self.server.url, self.server.token, kernel_id, V1), TIMEOUT
        )
        self.sockets.append(sock)
        return sock

    def close(self, sock: KernelSocket) -> None:
        sock.close()
        with contextlib.suppress(ValueError):
            self.sockets.remove(sock)

    async def model(self, kernel_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"/api/kernels/{kernel_id}"))

    async def intervals(self, kernel_id: str) -> list[dict[str, Any]]:
        return list((await self.call("GET", f"/api/usage?kernel={kernel_id}"))["intervals"])

    async def wait_warm(self) -> None:
        """Until the host has its warm H100 kernel and its warm CPU kernel again."""
        assert self.host is not None
        host = Server("host", self.host.url, self.host.token)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            status, body = await self.http.call(host, "GET", "/api/host")
            if status == 200 and sum(int(g["warm"]) for g in body["gpus"]) >= 1:
                if int(body["warm"]) >= 2:
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the warm pool did not refill within {TIMEOUT:.0f} s")

    def checkpoints(self) -> dict[Path, os.stat_result]:
        """The checkpoint files in the tenants' folders on the host."""
        found = {}
        for path in (self.where / "host" / "state" / "homes").glob("*/.gpupool/checkpoints/*"):
            with contextlib.suppress(OSError):
                found[path] = path.stat()
        return found

    async def cleanup(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(Exception):
                sock.close()
        if self.kernels:
            log(f"shutting down {len(self.kernels)} kernels left over")

        async def delete(kernel_id: str) -> None:
            with contextlib.suppress(Exception):
                await self.http.call(self.server, "DELETE", f"/api/kernels/{kernel_id}", None, 30)

        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(delete(k) for k in list(self.kernels))), 90)
        for proc in self.processes():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(proc.stop)

    def processes(self) -> list[Any]:
        """The host first (it stops its kernels), then the gateway."""
        return [p for p in (self.host, self.gateway) if p is not None]

    def logs(self) -> list[tuple[str, Callable[[], str]]]:
        return [(f"{p.url} ({p.log_path})", p.log) for p in self.processes()]


async def run_cell(sock: KernelSocket, code: str) -> str:
    out, reply = await sock.execute(code, TIMEOUT)
    if reply["status"] != "ok":
        raise RuntimeError(f"the cell {code[:40]!r} failed: {out}")
    return out


async def setup(bench: Bench) -> None:
    where = bench.where
    log(f"starting a gateway and a host with {GPUS} fake H100s")
    (where / "gateway").mkdir()
    (where / "host").mkdir()
    bench.gateway = await asyncio.to_thread(start_gateway, where / "gateway")
    bench.server = Server("gateway", bench.gateway.url, "")
    bench.server.token = await asyncio.to_thread(bench.gateway.tenant, "bench")
    bench.host = await asyncio.to_thread(
        start_host, where / "host", "--fake-gpus", f"H100:{GPUS}", "--no-isolate",
        "--gateway", bench.gateway.url, f"--join-token={bench.gateway.join_token}",
        "--heartbeat-seconds", "1",
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while True:
        status, gpus = await bench.http.call(bench.server, "GET", "/api/gpus")
        if status == 200 and {g["gpu_type"]: g["total"] for g in gpus}.get("H100") == GPUS:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the host did not join the gateway: {status} {gpus}")
        await asyncio.sleep(0.1)
    await bench.wait_warm()


# -- 1. billing end against the deadline -------------------------------------------------------


@dataclass
class Watch:
    """What the models of one kernel showed, from its cell until it was suspended.

    The deadline measured against is the model's `last_activity` plus `idle_timeout` (what the
    idle watch acts on), from the last model read before that time passed. The model's own
    `idle_deadline` is kept as it was right after the cell: the gateway learns that a kernel
    went idle only from a heartbeat, so until then it shows `now + idle_timeout` for a kernel
    that has finished its cell, and it shows that again while the suspend's own checkpoint
    makes the kernel busy."""

    shown: float  # `gpupool.idle_deadline` read right after the cell
    deadline: float  # `last_activity` + `idle_timeout`
    suspended_seen: float = 0.0
    pushed: bool = False  # after the deadline, the model still running showed one >= 0.5 s later

    @classmethod
    def after_cell(cls, model: dict[str, Any]) -> Watch | None:
        """None if the kernel is not running (it was suspended before the cell reached it)."""
        gpupool = model["gpupool"]
        if gpupool["state"] != "running" or not gpupool["idle_deadline"]:
            return None
        due = stamp(model["last_activity"]) + gpupool["idle_timeout"]
        return cls(shown=stamp(gpupool["idle_deadline"]), deadline=due)

    def see(self, model: dict[str, Any], now: float) -> bool:
        """Take in one model read at `now`; True once the kernel is suspended."""
        gpupool = model["gpupool"]
        if gpupool["state"] == "suspended":
            self.suspended_seen = self.suspended_seen or now
            return True
        if gpupool["state"] != "running":
            return False
        if now < self.deadline:  # activity before the deadline moves it
            due = stamp(model["last_activity"]) + gpupool["idle_timeout"]
            self.deadline = max(self.deadline, due)
        elif gpupool["idle_deadline"] and stamp(gpupool["idle_deadline"]) > self.deadline + 0.5:
            self.pushed = True
        return False


@dataclass
class Closing:
    kernel_id: str
    watch: Watch
    started: float  # seconds from the first request to the kernel's 201
    early: int  # times it was suspended before its cell's deadline could be read
    end: float = 0.0  # of its last interval that ended "suspended"


async def closings(bench: Bench, n: int, stagger: float) -> list[Closing]:
    burst = time.time()

    async def one(index: int) -> Closing:
        await asyncio.sleep(index * stagger)
        kernel_id = await bench.create()
        started = time.time() - burst
        sock = await bench.open(kernel_id)
        for early in range(5):
            await run_cell(sock, "x = 1")
            watch = Watch.after_cell(await bench.model(kernel_id))
            if watch is not None:
                return Closing(kernel_id, watch, started, early)
            # On a loaded machine 3 s can pass between the 201 and the cell: the kernel was
            # suspended first (the cell may even have run during its checkpoint, and been lost:
            # see the report). Run the cell again: it resumes the kernel.
        raise RuntimeError(f"kernel {kernel_id} was never running after its cell")

    items = list(await asyncio.gather(*(one(i) for i in range(n))))
    last = max(i.started for i in items)
    log(f"{n} kernels started and ran their cell; the last 201 after {secs(last)}")
    by_id = {i.kernel_id: i for i in items}
    limit = time.monotonic() + max(i.watch.deadline for i in items) - time.time() + TIMEOUT
    while any(not i.watch.suspended_seen for i in items):
        if time.monotonic() > limit:
            left = [i.kernel_id for i in items if not i.watch.suspended_seen]
            raise TimeoutError(f"{len(left)} kernels were not suspended in time: {left[:5]}")
        await asyncio.sleep(0.5)
        models = await bench.call("GET", "/api/kernels")
        now = time.time()
        for model in models:
            if model["id"] in by_id:
                by_id[model["id"]].watch.see(model, now)
    for item in items:
        suspended = [
            r for r in await bench.intervals(item.kernel_id) if r["end_reason"] == "suspended"
        ]
        if not suspended:
            raise RuntimeError(f"kernel {item.kernel_id} has no interval ended 'suspended'")
        item.end = stamp(suspended[-1]["end"])
    await asyncio.gather(*(bench.delete(i.kernel_id) for i in items))
    for sock in list(bench.sockets):
        bench.close(sock)
    return items


# -- 2. suspend and resume of a namespace ------------------------------------------------------


async def timed_cell(sock: KernelSocket, code: str) -> tuple[str, float]:
    """Run `code`; its stdout, and the seconds from sending it to the arrival of its first
    stdout output (after which the bench still waits for the reply and the idle status)."""
    t0 = time.perf_counter()
    msg_id = await sock.send(
        "shell", "execute_request", {"code": code, "silent": False, "store_history": False,
                                     "user_expressions": {}, "allow_stdin": False},
    )  # fmt: skip
    out: list[str] = []
    first: float | None = None
    reply: dict[str, Any] | None = None
    idle = False
    deadline = time.monotonic() + TIMEOUT
    while reply is None or not idle:
        msg = await sock.recv(max(deadline - time.monotonic(), 0.001))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "stream" and msg["content"]["name"] == "stdout":
            first = time.perf_counter() if first is None else first
            out.append(msg["content"]["text"])
        elif kind == "error":
            out.append("\n".join(msg["content"]["traceback"]))
        elif kind == "execute_reply":
            reply = msg["content"]
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    if reply["status"] != "ok" or first is None:
        raise RuntimeError(f"the cell {code[:40]!r} failed or printed nothing: {''.join(out)}")
    return "".join(out), first - t0


@dataclass
class Cycle:
    watch: Watch
    closed: float  # the interval's end
    written: float  # the checkpoint file's last write (mtime)
    checkpoint_bytes: int
    to_output: float  # print(len(a)) sent -> its output
    to_held: float  # sent -> the new interval starts (warm GPU taken)


async def cycle(bench: Bench, nbytes: int) -> Cycle:
    before = set(bench.checkpoints())
    kernel_id = await bench.create()
    sock = await bench.open(kernel_id)
    await run_cell(sock, f"import numpy as np\na = np.ones({nbytes}, dtype=np.uint8)")
    model = await bench.model(kernel_id)
    watch = Watch.after_cell(model)
    if watch is None:
        raise RuntimeError(f"kernel {kernel_id} is not running after its cell: {model}")
    limit = time.monotonic() + watch.deadline - time.time() + TIMEOUT
    while True:
        model = await bench.model(kernel_id)
        if watch.see(model, time.time()):
            break
        if time.monotonic() > limit:
            raise TimeoutError(f"kernel {kernel_id} was not suspended in time: {model}")
        await asyncio.sleep(0.02)
    new = {p: s for p, s in bench.checkpoints().items() if p not in before}
    if len(new) != 1:
        raise RuntimeError(f"expected one new checkpoint file, found {sorted(map(str, new))}")
    [written] = new.values()
    [first] = await bench.intervals(kernel_id)
    if first["end_reason"] != "suspended":
        raise RuntimeError(f"the interval ended {first['end_reason']!r}, not 'suspended'")
    await bench.wait_warm()
    await wait_quiet("before a resume")
    sent_wall = time.time()
    out, to_output = await timed_cell(sock, "print(len(a))")
    if out != f"{nbytes}\n":
        raise RuntimeError(f"after resume, print(len(a)) printed {out!r}, not {nbytes}")
    _, second = await bench.intervals(kernel_id)
    bench.close(sock)
    await bench.delete(kernel_id)
    return Cycle(
        watch=watch,
        closed=stamp(first["end"]),
        written=written.st_mtime,
        checkpoint_bytes=written.st_size,
        to_output=to_output,
        to_held=stamp(second["start"]) - sent_wall,
    )


# -- reporting ---------------------------------------------------------------------------------


def machine() -> str:
    return describe_machine(("jupyter_server", "ipykernel", "tornado", "numpy", "cloudpickle"))


def row(what: str, values: list[float], check: str = "") -> str:
    return (
        f"| {what} | {len(values)} | {secs(min(values))} | {secs(median(values))} | "
        f"{secs(p90(values))} | {secs(max(values))} | {check} |"
    )


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(
    items: list[Closing], stagger: float, cycles: dict[str, list[Cycle]], skipped: list[str]
) -> None:
    lines = [
        "| measurement | n | min | median | p90 | max | check |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    n = len(items)
    how = "all at once" if stagger == 0 else f"one every {secs(stagger)}"
    late = [i.end - i.watch.deadline for i in items]
    within = sum(1 for d in late if 0 <= d <= CLOSE_TARGET)
    early = sum(1 for d in late if d < 0)
    check = f"{within}/{n} within {CLOSE_TARGET:g} s; target every one: {met(within == n)}"
    if early:
        check += f"; {early} closed BEFORE the deadline"
    lines += [
        row(f"interval end - deadline (`last_activity` + 3 s), {n} kernels started {how}", late,
            check),
        row("`gpupool.idle_deadline` shown right after the cell - deadline",
            [i.watch.shown - i.watch.deadline for i in items]),
    ]  # fmt: skip
    for label, _ in SIZES:
        runs = cycles.get(label)
        if not runs:
            continue
        stored = size(median([c.checkpoint_bytes for c in runs]))
        outputs = [c.to_output for c in runs]
        check = "output is len(a)"
        if label == "100 MiB":
            worst = max(outputs)
            check += f"; target < {RESUME_TARGET:g} s: {met(worst < RESUME_TARGET)}"
            if median(outputs) < RESUME_TARGET <= worst:
                check += " (median met, not every run)"
        lines += [
            row(f"{label}: suspend, interval end - deadline",
                [c.closed - c.watch.deadline for c in runs]),
            row(f"{label}: suspend, checkpoint file written - deadline",
                [c.written - c.watch.deadline for c in runs], f"checkpoint file {stored}"),
            row(f"{label}: suspend, model first seen `suspended` - deadline (polled every 20 ms)",
                [c.watch.suspended_seen - c.watch.deadline for c in runs]),
            row(f"{label}: resume, `print(len(a))` sent → GPU held again (new interval)",
                [c.to_held for c in runs]),
            row(f"{label}: resume on a warm GPU, `print(len(a))` sent → output", outputs, check),
        ]  # fmt: skip
    for line in lines:
        print(line)
    print()
    starts = sorted(i.started for i in items)
    deadlines = sorted(i.watch.deadline for i in items)
    resent = sum(1 for i in items if i.early)
    overstated = sum(1 for i in items if i.watch.shown - i.watch.deadline > 0.05)
    watches = [i.watch for i in items] + [c.watch for r in cycles.values() for c in r]
    pushed = sum(1 for w in watches if w.pushed)
    print(
        f"Part 1: the {n} kernels answered 201 between {secs(starts[0])} and {secs(starts[-1])} "
        f"after the first request; their deadlines spread over "
        f"{secs(deadlines[-1] - deadlines[0])}. {resent} kernels were suspended before their "
        f"cell's deadline could be read (over 3 s between the 201 and the cell), so the cell "
        f"was run again, resuming them, and the later suspend is the one measured. Right after "
        f"the cell, {overstated} of {n} models showed an `idle_deadline` over 50 ms later than "
        f"`last_activity` + 3 s (the gateway had not yet heard from a heartbeat that the "
        f"kernel was idle)."
    )
    print(
        f"In {pushed} of {len(watches)} suspends, a model read after the deadline, while the "
        f"kernel was still `running`, showed `idle_deadline` 0.5 s or more after it: the "
        f"suspend's own checkpoint makes the kernel busy, and a busy kernel shows now + 3 s."
    )
    if skipped:
        print(f"Not measured: {'; '.join(skipped)}.")


# -- main -------------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace, bench: Bench) -> None:
    started = time.perf_counter()
    await setup(bench)
    log(f"set up in {time.perf_counter() - started:.0f} s; {args.kernels} kernels at once")
    await wait_quiet("before the burst of kernels")
    items = await closings(bench, args.kernels, args.stagger)
    log(
        "interval end - deadline: "
        + ", ".join(secs(v) for v in sorted(i.end - i.watch.deadline for i in items))
    )
    cycles: dict[str, list[Cycle]] = {}
    skipped = []
    for label, nbytes in SIZES:
        if label == "1 GiB" and args.no_gib:
            skipped.append("1 GiB (--no-gib)")
            continue
        for run in range(args.repeats):
            await bench.wait_warm()
            await wait_quiet("before a namespace cycle")
            c = await cycle(bench, nbytes)
            cycles.setdefault(label, []).append(c)
            log(
                f"{label} run {run + 1}/{args.repeats}: closed "
                f"{secs(c.closed - c.watch.deadline)}, written "
                f"{secs(c.written - c.watch.deadline)}, seen "
                f"{secs(c.watch.suspended_seen - c.watch.deadline)} after the deadline; "
                f"{size(c.checkpoint_bytes)}; resumed: GPU held {secs(c.to_held)}, "
                f"output {secs(c.to_output)}"
            )
    elapsed = time.perf_counter() - started
    for line in run_lines(machine(), MEASURED, elapsed):
        print(line)
    if NOT_QUIET:
        print(
            f"warning: {len(NOT_QUIET)} waits for the bench's processes to go idle gave up "
            f"({', '.join(sorted(set(NOT_QUIET)))}); those samples may include background work"
        )
    print()
    report(items, args.stagger, cycles, skipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, default=50, help="kernels started at once (50)")
    parser.add_argument("--repeats", type=int, default=3, help="cycles per namespace size (3)")
    parser.add_argument(
        "--stagger", type=float, default=0.0,
        help="seconds between the kernels' requests in part 1 (0: all at once)",
    )  # fmt: skip
    parser.add_argument("--no-gib", action="store_true", help="skip the 1 GiB namespace")
    args = parser.parse_args()
    if not 1 <= args.kernels <= GPUS - 2:
        parser.error(f"--kernels must be from 1 to {GPUS - 2}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not 0 <= args.stagger <= 10:
        parser.error("--stagger must be from 0 to 10 seconds")

    run_main(
        "gpupool-bench-idle-",
        Bench,
        lambda started: run_bench(args, started),
        "the gateway, the host and the kernels",
    )


if __name__ == "__main__":
    main()
