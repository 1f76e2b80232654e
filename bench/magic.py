"""`%%gpu` benchmark: empty-cell overhead on a warm companion, and push and pull of 100 MB.

Run from the repository root, after `pip install -e ".[bench]"` (which `make bench` does):

    .venv/bin/python bench/magic.py [--cells 50] [--reps 7]

On loopback: the embedded stack (`gpupool up --no-lab`: a gateway and one local host with two
fake H100s, a demo tenant), one local ipykernel started with jupyter_client whose environment
has GPUPOOL_URL and GPUPOOL_TOKEN, and an ipyparallel cluster of one engine (controller on
127.0.0.1) as the baseline. In the local kernel: `%load_ext jupyter_ext`, a first `%%gpu` cell
that starts the companion (not measured), an ipyparallel Client with `%px` aimed at its one
engine, and `pre_run_cell`/`post_run_cell` hooks that time each cell inside the kernel.

Every measured cell is timed from the client: execute_request sent until both its
execute_reply and its idle status have arrived (all its output drained). The hooks give, for
the same cell, the time spent inside the local kernel (without the ZMQ round trip).

1. Empty cells, `--cells` of each, in interleaved rounds after warm-up: `pass` (local, the
   baseline), `%%gpu\\npass` on the warm companion, `%%px\\npass` on the one engine. Overhead is
   a path's median minus the local median. Targets: the `%%gpu` overhead under 10 ms, and at
   most that of `%%px`.
2. 100 MB (10**8 bytes, float64) each way, `--reps` times, interleaved, the order of the two
   tools swapped every repetition:
   - push: `a[0]` set to a new value in an untimed local cell (unchanged values are not sent
     again), then `%%gpu --no-pull` printing `a[0]`, against `rc[0].push({"a": a},
     block=True)`; both are checked to have the new `a[0]` on the other side.
   - make and pull: `%%gpu --pull b` with `b = np.full(...)`, against the engine running the
     same line and `rc[0].pull("b", block=True)`; the bytes arrived are checked here.
   - pull only: `%gpu pull b` against `rc[0].pull("b", block=True)`.
   MB/s is 100 MB over the cell's median time. Target: push and pull at least 300 MB/s.

Every wait is bounded, and every kernel and process started is stopped at the end, also on
error, SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway import NOT_QUIET, log, median, ms, p90, wait_quiet  # noqa: E402
from bench.harness import describe_machine, run_lines, run_main  # noqa: E402
from tests.conftest import Gateway, start_stack  # noqa: E402

NBYTES = 100_000_000
FLOATS = NBYTES // 8
TIMEOUT = 60.0  # seconds: the most any one cell may take
OVERHEAD_TARGET = 0.010  # seconds: empty %%gpu cell over an empty local cell
RATE_TARGET = 300.0  # MB/s
MEASURED = ("jupyter_ext", "kernel_gateway", "gpu_host", "bench/magic.py")

# Run once in the local kernel: a timer around every cell, read back with user_expressions.
HOOKS = """\
import time as _bench_time
_bench = {"t0": 0.0, "s": 0.0}
def _bench_pre(*_):
    _bench["t0"] = _bench_time.perf_counter()
def _bench_post(*_):
    _bench["s"] = _bench_time.perf_counter() - _bench["t0"]
get_ipython().events.register("pre_run_cell", _bench_pre)
get_ipython().events.register("post_run_cell", _bench_post)
"""


def secs(value: float) -> str:
    return ms(value) if value < 1 else f"{value:.2f} s"


def rate(seconds: float) -> float:
    return NBYTES / 1e6 / seconds


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


@dataclass
class Ran:
    """One cell: seconds seen from the client, seconds inside the kernel, its stdout."""

    client: float
    inside: float
    stdout: str


class LocalKernel:
    """The notebook's own kernel: a local ipykernel spoken to with jupyter_client."""

    def __init__(self, where: Path) -> None:
        self.km = AsyncKernelManager(
            kernel_name="python3", connection_file=str(where / "local-kernel.json")
        )
        self.kc: Any = None

    async def start(self, env: dict[str, str], cwd: Path) -> None:
        await asyncio.wait_for(self.km.start_kernel(env=env, cwd=str(cwd)), TIMEOUT)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=TIMEOUT)
        await self.run(HOOKS)

    async def run(self, code: str, timeout: float = TIMEOUT) -> Ran:
        """Run `code`; raise if it fails. Timed until both the reply and the idle status."""
        began = time.perf_counter()
        msg_id = self.kc.execute(code, user_expressions={"s": '_bench["s"]'})
        deadline = time.monotonic() + timeout
        out: list[str] = []
        errors: list[str] = []
        while True:
            msg = await self.kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.001))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                (out if content["name"] == "stdout" else errors).append(content["text"])
            elif kind == "error":
                errors.append("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                break
        while True:
            reply = await self.kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.001))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        elapsed = time.perf_counter() - began
        content = reply["content"]
        if content["status"] != "ok":
            raise RuntimeError(f"the cell {code[:60]!r} failed:\n{''.join(errors)}")
        inside = content["user_expressions"].get("s", {})
        seconds = float(inside["data"]["text/plain"]) if inside.get("status") == "ok" else 0.0
        return Ran(elapsed, seconds, "".join(out))

    async def stop(self) -> None:
        """A graceful shutdown, so that the magic's atexit releases the companion."""
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        with contextlib.suppress(Exception):
            if self.km.has_kernel:
                try:
                    await asyncio.wait_for(self.km.shutdown_kernel(), 30)
                except asyncio.TimeoutError:
                    await asyncio.wait_for(self.km.shutdown_kernel(now=True), 10)


@dataclass
class Bench:
    """Everything started, so that it can all be stopped."""

    where: Path
    stack: Gateway | None = None
    cluster: Any = None
    kernel: LocalKernel | None = None

    async def cleanup(self) -> None:
        if self.kernel is not None:
            await self.kernel.stop()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.cluster.stop_cluster(), 30)
        if self.stack is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.stack.stop)

    def logs(self) -> list[tuple[str, Callable[[], str]]]:
        stack = self.stack
        return [] if stack is None else [(f"the stack ({stack.log_path})", stack.log)]


@dataclass
class Series:
    label: str
    runs: list[Ran] = field(default_factory=list)

    def client(self) -> list[float]:
        return [r.client for r in self.runs]

    def inside(self) -> list[float]:
        return [r.inside for r in self.runs]


async def setup(bench: Bench) -> LocalKernel:
    where = bench.where
    import ipyparallel as ipp

    log("starting the embedded stack (gateway + host with 2 fake H100s) and a 1-engine cluster")
    (where / "stack").mkdir()
    bench.stack = await asyncio.to_thread(start_stack, where / "stack", "H100:2")
    bench.cluster = ipp.Cluster(
        n=1, profile_dir=str(where / "ipp"), cluster_id="bench", controller_ip="127.0.0.1",
        log_level=logging.ERROR,  # not the engine's whole log as a warning: it exits 1 when stopped
    )  # fmt: skip
    await asyncio.wait_for(bench.cluster.start_cluster(), TIMEOUT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    env.update(GPUPOOL_URL=bench.stack.url, GPUPOOL_TOKEN=bench.stack.token)
    kernel = bench.kernel = LocalKernel(where)
    await kernel.start(env, where)
    log("local kernel up: loading the extension, starting the companion and the engine")
    await kernel.run(f"%load_ext jupyter_ext\nimport numpy as np\nM = {FLOATS}", timeout=TIMEOUT)
    started = await kernel.run("%%gpu --no-pull\nimport numpy as np")
    log(f"companion started by the first %%gpu cell in {secs(started.client)}")
    await kernel.run(
        "import ipyparallel as ipp\n"
        f"rc = ipp.Client(profile_dir={str(where / 'ipp')!r}, cluster_id='bench')\n"
        f"rc.wait_for_engines(1, timeout={TIMEOUT})\n"
        "engine = rc[0]\nengine.block = True\nengine.activate()\nengine.push({'M': M})\n"
    )
    await kernel.run("%%px\nimport numpy as np")
    return kernel


async def empty_cells(kernel: LocalKernel, n: int) -> list[Series]:
    paths = [
        Series("local `pass` (baseline)"),
        Series("`%%gpu` on the warm companion"),
        Series("`%%px` on one local ipyparallel engine"),
    ]
    codes = ["pass", "%%gpu\npass", "%%px\npass"]
    for code in codes:  # warm-up
        for _ in range(5):
            await kernel.run(code)
    rounds = 5
    for r in range(rounds):
        count = n // rounds + (r < n % rounds)
        for series, code in zip(paths, codes, strict=True):
            for _ in range(count):
                series.runs.append(await kernel.run(code))
    return paths


def expect(ran: Ran, wanted: str, what: str) -> None:
    if ran.stdout.strip() != wanted:
        raise RuntimeError(f"{what}: expected {wanted!r}, got {ran.stdout!r}")


async def transfers(kernel: LocalKernel, reps: int) -> dict[str, Series]:
    s = {
        key: Series(label)
        for key, label in (
            ("gpu push", "`%%gpu --no-pull` cell that reads `a`"),
            ("px push", 'ipyparallel `rc[0].push({"a": a}, block=True)` (baseline)'),
            ("gpu make", "`%%gpu --pull b` cell: `b = np.full(M, k)`"),
            ("px make", 'ipyparallel `execute("b = np.full(M, k)")` + `pull("b")` (baseline)'),
            ("gpu pull", "`%gpu pull b` (pull only)"),
            ("px pull", 'ipyparallel `rc[0].pull("b", block=True)` (baseline)'),
        )
    }
    await kernel.run(f"a = np.zeros({FLOATS})")
    for k in range(1, reps + 2):  # the first repetition is a warm-up
        keep = k > 1

        def add(key: str, ran: Ran, on: bool = keep) -> None:
            if on:
                s[key].runs.append(ran)

        async def gpu_push(k: int = k) -> None:
            await kernel.run(f"a[0] = {2 * k}")
            ran = await kernel.run("%%gpu --no-pull\nprint(int(a[0]), a.nbytes)")
            expect(ran, f"{2 * k} {NBYTES}", "the GPU kernel's a[0] and a.nbytes after the push")
            add("gpu push", ran)

        async def px_push(k: int = k) -> None:
            await kernel.run(f"a[0] = {2 * k + 1}")
            add("px push", await kernel.run('_r = engine.push({"a": a}, block=True)'))
            check = await kernel.run(
                'engine.execute("_c = int(a[0]), a.nbytes")\nprint(*engine.pull("_c"))'
            )
            expect(check, f"{2 * k + 1} {NBYTES}", "the engine's a[0] and a.nbytes after the push")

        async def gpu_pulls(k: int = k) -> None:
            add("gpu make", await kernel.run(f"%%gpu --pull b\nb = np.full(M, {k}.0)"))
            expect(await kernel.run("print(b.nbytes, b[-1])"), f"{NBYTES} {k}.0", "pulled b")
            add("gpu pull", await kernel.run("%gpu pull b"))
            expect(await kernel.run("print(b.nbytes, b[-1])"), f"{NBYTES} {k}.0", "pulled b")

        async def px_pulls(k: int = k) -> None:
            code = f'engine.execute("b = np.full(M, {k}.0)", block=True)\nb = engine.pull("b")'
            add("px make", await kernel.run(code))
            expect(await kernel.run("print(b.nbytes, b[-1])"), f"{NBYTES} {k}.0", "pulled b")
            add("px pull", await kernel.run('b = engine.pull("b", block=True)'))
            expect(await kernel.run("print(b.nbytes, b[-1])"), f"{NBYTES} {k}.0", "pulled b")

        order = [gpu_push, px_push] if k % 2 else [px_push, gpu_push]
        order += [gpu_pulls, px_pulls] if k % 2 else [px_pulls, gpu_pulls]
        for step in order:
            await kernel.run("b = None")
            await step()
        log(f"100 MB transfers: repetition {k - 1 if keep else 'warm-up'} done")
    return s


# -- reporting ---------------------------------------------------------------------------------


def machine() -> str:
    return describe_machine(
        ("ipykernel", "jupyter_client", "pyzmq", "tornado", "cloudpickle", "numpy", "ipyparallel")
    )


def report(empty: list[Series], moved: dict[str, Series]) -> list[str]:
    lines = [
        "| measurement | path | n | median | p90 | vs baseline | inside the local kernel, "
        "median | check |",
        "|---|---|--:|--:|--:|--:|--:|---|",
    ]
    base = median(empty[0].client())
    overheads = [median(series.client()) - base for series in empty]
    for index, series in enumerate(empty):
        value = median(series.client())
        against = "1.00x" if index == 0 else f"{value / base:.2f}x, +{ms(overheads[index])}"
        check = ""
        if index == 1:
            small = overheads[1] < OVERHEAD_TARGET
            px = overheads[1] <= overheads[2]
            check = (f"target overhead < {OVERHEAD_TARGET * 1e3:.0f} ms: {met(small)}; "
                     f"target <= `%%px` overhead: {met(px)}")  # fmt: skip
        lines.append(
            f"| empty cell | {series.label} | {len(series.runs)} | {ms(value)} | "
            f"{ms(p90(series.client()))} | {against} | {ms(median(series.inside()))} | {check} |"
        )
    for ours, theirs, what in (
        ("gpu push", "px push", "push 100 MB"),
        ("gpu make", "px make", "make and pull 100 MB"),
        ("gpu pull", "px pull", "pull 100 MB"),
    ):
        base_rate = rate(median(moved[theirs].client()))
        for key in (ours, theirs):
            series = moved[key]
            value = median(series.client())
            inside = median(series.inside())
            check = ""
            if key == ours:
                check = f"target >= {RATE_TARGET:.0f} MB/s: {met(rate(value) >= RATE_TARGET)}"
            lines.append(
                f"| {what} | {series.label} | {len(series.runs)} | {secs(value)} "
                f"({rate(value):.0f} MB/s) | {secs(p90(series.client()))} | "
                f"{rate(value) / base_rate:.2f}x rate | {secs(inside)} "
                f"({rate(inside):.0f} MB/s) | {check} |"
            )
    return lines


# -- main -------------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace, bench: Bench) -> None:
    started = time.perf_counter()
    kernel = await setup(bench)
    log(f"set up in {time.perf_counter() - started:.0f} s")
    await wait_quiet("before the empty cells")
    log(f"empty cells: {args.cells} per path")
    empty = await empty_cells(kernel, args.cells)
    for series in empty:
        log(f"  {series.label}: median {ms(median(series.client()))}")
    await wait_quiet("before the transfers")
    log(f"100 MB push and pull: {args.reps} repetitions")
    moved = await transfers(kernel, args.reps)
    elapsed = time.perf_counter() - started
    for line in run_lines(machine(), MEASURED, elapsed):
        print(line)
    if NOT_QUIET:
        print(
            f"warning: {len(NOT_QUIET)} waits for the bench's processes to go idle gave up "
            f"({', '.join(sorted(set(NOT_QUIET)))}); those samples may include background work"
        )
    print()
    for line in report(empty, moved):
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=50, help="empty cells per path (50)")
    parser.add_argument("--reps", type=int, default=7, help="100 MB transfers per path (7)")
    args = parser.parse_args()
    if not 5 <= args.cells <= 1000 or not 1 <= args.reps <= 50:
        parser.error("--cells must be from 5 to 1000 and --reps from 1 to 50")
    try:
        import ipyparallel  # noqa: F401
    except ImportError:
        parser.error('ipyparallel is missing: pip install -e ".[bench]" (make bench does it)')

    def start(where: Path) -> Bench:
        os.environ["IPYTHONDIR"] = str(where / "ipython")  # every kernel's profile
        return Bench(where)

    run_main(
        "gpupool-bench-magic-", start, lambda bench: run_bench(args, bench),
        "the kernels, the cluster and the stack", limit=600,
    )  # fmt: skip


if __name__ == "__main__":
    main()
