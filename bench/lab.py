"""Lab benchmark (issue 11): a `1+1` round trip over a kernel websocket through our hybrid Lab to
a pool kernel and to a local kernel, against stock jupyter_server and direct ZMQ; and kernel
ready in a real browser, launcher click to idle, pool against local.

Run from the repository root:

    .venv/bin/python bench/lab.py [--iterations N] [--opens N]

Everything runs on loopback in one scratch folder:

- the embedded stack, `python -m gpupool.cli up --no-lab --fake-gpus H100:2` (a gateway,
  one host with two fake H100s and its warm pool, a demo tenant);
- our hybrid Lab: `python -m jupyterlab` WITHOUT `--gateway-url`, with GPUPOOL_URL and
  GPUPOOL_TOKEN in its environment, the pool kernelspecs synced by
  `python -m jupyter_ext.kernelspecs sync` into its own JUPYTER_DATA_DIR, the built front end
  linked into `<tmp>/data/labextensions/@gpupool/labextension` (JUPYTER_PATH) and the server
  extension enabled by a JUPYTER_CONFIG_DIR holding the shipped
  `jupyter_server_config.d/gpupool.json`;
- two stock jupyter_servers, our extension disabled (`--ServerApp.jpserver_extensions=
  jupyter_ext=False`, which also overrides the copy `make install` puts in the venv): one with
  local kernels, one in gateway mode (`--gateway-url` and JUPYTER_GATEWAY_AUTH_TOKEN) in front
  of the same gateway.

1. Execute round trip: execute_request of `1+1` until both its execute_reply and its idle status
   have arrived (as bench/gateway.py and bench/host_start.py time it), over a kernel websocket
   (tests/kernel_ws.py's tornado client, v1 protocol asked for; a fresh websocket per round),
   in interleaved rounds, on each path: direct jupyter_client over ZMQ (TCP) to a local
   ipykernel (the baseline); a local kernel through our Lab and through the stock server; the
   pool kernel `python3-gpu-h100-x1` through our Lab (the pool provisioner's bridge, then the
   gateway) and through the stock server in gateway mode; and, to split the pool path, that
   gateway-mode kernel straight at the gateway's websocket (diagnostic).
2. Kernel ready in the browser: Debian's chromium through Playwright (as tests/ui/lab_stack.py
   launches it) on our Lab; a click on a launcher card (the one-H100 shape's in the GPU pool
   section, or "Python 3 (ipykernel)"), timed until the status bar shows the notebook's kernel
   idle; then the notebook is closed and its kernel shut down. One untimed open of each first
   (Lab loads the notebook code on the first), then `--opens` of each, alternating which goes
   first, each on a quiet machine (the pool's warm kernel refilled). Skipped, and said so, without
   /usr/bin/chromium or the built front end.

Targets: the pool kernel through our Lab within 1.5x of direct ZMQ; the local kernel through
our Lab no slower than through stock jupyter_server (5% allowed for noise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench.gateway import (  # noqa: E402
    LOCAL_NOISE,
    NOT_QUIET,
    TIMEOUT,
    DirectKernel,
    Http,
    JupyterServer,
    Server,
    log,
    median,
    met,
    ms,
    p90,
    ratio,
    socket_execute,
    wait_jupyter_server,
    wait_quiet,
)
from bench.harness import describe_machine, run_lines, run_main  # noqa: E402
from tests.conftest import Gateway, free_port, start_stack  # noqa: E402
from tests.kernel_ws import V1, KernelSocket  # noqa: E402

POOL_SPEC = "python3-gpu-h100-x1"
POOL_DISPLAY = "Python 3 \u00b7 H100 \u00d71"  # the pool kernelspec's display name
LOCAL_DISPLAY = "Python 3 (ipykernel)"
TARGET_POOL_RATIO = 1.5
WITHOUT_OURS = "--ServerApp.jpserver_extensions=jupyter_ext=False"
OURS_LOADED = "gpupool: /gpupool/ routes"  # the server extension's line at load
CHROMIUM = Path("/usr/bin/chromium")
BUILT = REPO / "jupyter_ext" / "labextension"
SHIPPED_CONFIG = REPO / "jupyter-config" / "server-config" / "gpupool.json"
WAIT_MS = 60_000
NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"
MEASURED = ("jupyter_ext", "kernel_gateway", "gpu_host", "bench/lab.py", "tests/kernel_ws.py")


# -- servers ----------------------------------------------------------------------------------


def spawn_server(
    where: Path, name: str, *, ours: bool, lab: bool = False, gateway: Server | None = None,
    env: dict[str, str] | None = None,
) -> JupyterServer:  # fmt: skip
    """`python -m jupyterlab` or `python -m jupyter_server` on loopback with its own token, its
    own Jupyter folders and no GPUPOOL_*/JUPYTER_* variables but `env`; our server extension
    disabled unless `ours`; in gateway mode when `gateway` is given."""
    where.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token = f"bench-{port}-{secrets.token_hex(8)}"
    full = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    full.update(JUPYTER_RUNTIME_DIR=str(where / "runtime"),
                JUPYTER_CONFIG_DIR=str(where / "config"),
                JUPYTER_DATA_DIR=str(where / "user-data"))  # fmt: skip
    full.update(env or {})
    command = [sys.executable, "-m", "jupyterlab" if lab else "jupyter_server", "--no-browser",
               f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={where}", "--allow-root"]  # fmt: skip
    if not ours:
        command.append(WITHOUT_OURS)
    if gateway is not None:
        command += [f"--gateway-url={gateway.url}", "--GatewayClient.request_timeout=120"]
        full["JUPYTER_GATEWAY_AUTH_TOKEN"] = gateway.token
    log_path = where / "server.log"
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=full, cwd=where
        )
    return JupyterServer(proc, Server(name, f"http://127.0.0.1:{port}", token), log_path)


def hybrid_lab_env(where: Path, stack: Gateway) -> dict[str, str]:
    """Our Lab's environment: the pool's URL and token, the front end where Jupyter looks
    (JUPYTER_PATH) and the server extension enabled by the shipped config file."""
    data = where / "data" / "labextensions" / "@gpupool"
    data.mkdir(parents=True)
    if (BUILT / "package.json").exists():
        (data / "labextension").symlink_to(BUILT)
    conf_d = where / "config" / "jupyter_server_config.d"
    conf_d.mkdir(parents=True)
    (conf_d / "gpupool.json").write_text(SHIPPED_CONFIG.read_text())
    return {
        "GPUPOOL_URL": stack.url,
        "GPUPOOL_TOKEN": stack.token,
        "JUPYTER_PATH": str(where / "data"),
        "JUPYTER_DATA_DIR": str(where / "user-data"),
    }


# -- everything started, so that it can all be stopped ----------------------------------------


@dataclass
class Bench:
    where: Path
    http: Http = field(default_factory=Http)
    stack: Gateway | None = None
    servers: list[JupyterServer] = field(default_factory=list)
    kernels: list[tuple[Server, str]] = field(default_factory=list)
    direct: DirectKernel | None = None
    protocols: dict[str, str | None] = field(default_factory=dict)  # path -> subprotocol

    async def create(self, server: Server, name: str) -> str:
        status, body = await self.http.call(server, "POST", "/api/kernels", {"name": name}, 120)
        if status != 201:
            raise RuntimeError(f"{server.name}: POST /api/kernels {name} answered {status}: {body}")
        self.kernels.append((server, body["id"]))
        return str(body["id"])

    async def delete(self, server: Server, kernel_id: str) -> None:
        with contextlib.suppress(ValueError):
            self.kernels.remove((server, kernel_id))
        status, body = await self.http.call(server, "DELETE", f"/api/kernels/{kernel_id}")
        if status not in (204, 404):
            raise RuntimeError(f"{server.name}: DELETE {kernel_id} answered {status}: {body}")

    def logs(self) -> list[tuple[str, Callable[[], str]]]:
        found: list[tuple[str, Callable[[], str]]] = [
            (f"{js.server.name} ({js.log_path})", js.log) for js in self.servers
        ]
        if self.stack is not None:
            found.append((f"the stack ({self.stack.log_path})", self.stack.log))
        return found

    async def cleanup(self) -> None:
        for server, kernel_id in list(self.kernels):
            with contextlib.suppress(Exception):
                await self.delete(server, kernel_id)
        if self.direct is not None:
            await self.direct.stop()
        for js in self.servers:  # they speak to the gateway: stopped first
            with contextlib.suppress(Exception):
                await asyncio.to_thread(js.stop)
        if self.stack is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.stack.stop)


@dataclass
class Servers:
    ours: Server  # the hybrid Lab
    stock_local: Server
    stock_gateway: Server  # gateway mode
    gateway: Server  # the gateway itself, as the demo tenant


async def setup(bench: Bench) -> Servers:
    where = bench.where
    log("starting the embedded stack (gateway + host with 2 fake H100s)")
    (where / "stack").mkdir()
    stack = await asyncio.to_thread(start_stack, where / "stack", "H100:2")
    bench.stack = stack
    gateway = Server("gateway", stack.url, stack.token)
    env = hybrid_lab_env(where / "lab", stack)
    synced = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "jupyter_ext.kernelspecs", "sync"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if synced.returncode != 0:
        raise RuntimeError(f"kernelspec sync failed: {synced.stdout}{synced.stderr}")
    log("starting our hybrid Lab and two stock jupyter_servers (local; gateway mode)")
    ours = spawn_server(where / "lab", "our hybrid Lab", ours=True, lab=True, env=env)
    stock_local = spawn_server(where / "stock-local", "stock jupyter_server", ours=False)
    stock_gw = spawn_server(
        where / "stock-gateway", "stock jupyter_server gateway mode", ours=False, gateway=gateway
    )
    bench.servers += [ours, stock_local, stock_gw]
    await asyncio.gather(*(asyncio.to_thread(wait_jupyter_server, js) for js in bench.servers))
    # What each server is: our extension loaded where it should be, and only there; our Lab
    # lists the pool's kernelspec beside its local python3.
    for js, loaded in ((ours, True), (stock_local, False), (stock_gw, False)):
        if (OURS_LOADED in js.log_path.read_text(errors="replace")) != loaded:
            raise RuntimeError(f"{js.server.name}: our extension loaded should be {loaded}")
    status, specs = await bench.http.call(ours.server, "GET", "/api/kernelspecs")
    names = set((specs or {}).get("kernelspecs", {})) if status == 200 else set()
    if not {"python3", POOL_SPEC} <= names:
        raise RuntimeError(f"our Lab lists {sorted(names)}, not python3 and {POOL_SPEC}")
    return Servers(ours.server, stock_local.server, stock_gw.server, gateway)


# -- round trips ------------------------------------------------------------------------------

LABELS = {
    "direct": "direct jupyter_client over ZMQ, local ipykernel (baseline)",
    "stock_local": "stock jupyter_server, local kernel",
    "ours_local": "our hybrid Lab, local kernel",
    "stock_gateway": "stock jupyter_server gateway mode, pool kernel",
    "ours_pool": "our hybrid Lab, pool kernel (provisioner bridge)",
    "gateway": "gateway websocket, straight (diagnostic)",
}


async def round_trips(bench: Bench, servers: Servers, iterations: int) -> dict[str, list[float]]:
    """`iterations` timed `1+1` per path, in up to 5 interleaved rounds, after 10 untimed ones
    per round; a fresh websocket per round. Every reply is checked."""
    bench.direct = DirectKernel(bench.where, transport="tcp")  # as Lab reaches local kernels
    await bench.direct.start()
    ids: dict[str, str] = {}
    targets: dict[str, Server] = {
        "stock_local": servers.stock_local, "ours_local": servers.ours,
        "stock_gateway": servers.stock_gateway, "ours_pool": servers.ours,
        "gateway": servers.gateway,
    }  # fmt: skip
    ids["stock_local"] = await bench.create(servers.stock_local, "python3")
    ids["ours_local"] = await bench.create(servers.ours, "python3")
    ids["ours_pool"] = await bench.create(servers.ours, POOL_SPEC)
    ids["stock_gateway"] = ids["gateway"] = await bench.create(servers.stock_gateway, POOL_SPEC)
    rounds = max(1, min(5, iterations // 40))
    counts = [iterations // rounds + (r < iterations % rounds) for r in range(rounds)]
    times: dict[str, list[float]] = {key: [] for key in LABELS}
    await wait_quiet("before the round trips")
    log(f"execute round trip: {iterations} per path, in {rounds} interleaved rounds")
    for count in counts:
        for key in LABELS:
            sock: KernelSocket | None = None
            if key != "direct":
                sock = await asyncio.wait_for(
                    KernelSocket.open(targets[key].url, targets[key].token, ids[key], V1), TIMEOUT
                )
                bench.protocols[key] = sock.protocol
            try:
                for i in range(10 + count):
                    t0 = time.perf_counter()
                    if sock is None:
                        assert bench.direct is not None
                        _, reply = await bench.direct.execute("1+1")
                    else:
                        reply = (await socket_execute(sock, "1+1"))[1]
                    elapsed = time.perf_counter() - t0
                    if reply.get("status") != "ok":
                        raise RuntimeError(f"{LABELS[key]}: `1+1` failed: {reply}")
                    if i >= 10:
                        times[key].append(elapsed)
            finally:
                if sock is not None:
                    sock.close()
        log("  medians so far: " + ", ".join(f"{k} {ms(median(v))}" for k, v in times.items()))
    for key in ("stock_local", "ours_local", "ours_pool", "stock_gateway"):
        await bench.delete(targets[key], ids[key])
    await bench.direct.stop()
    bench.direct = None
    return times


# -- the browser ------------------------------------------------------------------------------


@dataclass
class Opens:
    label: str
    samples: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def browser_opens(bench: Bench, ours: Server, opens: int) -> tuple[list[Opens], str]:
    """Kernel ready from the launcher, pool against local; (series, browser version)."""
    from playwright.async_api import async_playwright

    cards = {
        "pool": ('.jp-LauncherCard[data-category="GPU pool"]', "H100 \u00d71", POOL_DISPLAY),
        "local": (f'.jp-LauncherCard[data-category="Notebook"][title^="{LOCAL_DISPLAY}"]', None,
                  LOCAL_DISPLAY),
    }  # fmt: skip
    series = {
        "pool": Opens(f"pool kernel ({POOL_SPEC}), card 'H100 \u00d71' in the GPU pool section"),
        "local": Opens(f"local kernel, card '{LOCAL_DISPLAY}'"),
    }
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )  # as tests/ui/lab_stack.py launches it
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(f"{ours.url}/lab?token={ours.token}")
            await page.wait_for_selector(cards["pool"][0], timeout=90_000)
            with contextlib.suppress(Exception):  # Lab asks about its news feed once
                await page.get_by_role("button", name="No", exact=True).click(timeout=5_000)

            async def one(kind: str) -> float:
                selector, text, display = cards[kind]
                card = page.locator(selector)
                if text is not None:
                    card = card.filter(has_text=text)
                await card.first.wait_for(timeout=WAIT_MS)
                status = (
                    page.locator(".jp-StatusBar-Widget")
                    .filter(has_text=display)
                    .filter(has_text="| Idle")
                )
                t0 = time.perf_counter()
                await card.first.click(timeout=WAIT_MS)
                await status.first.wait_for(timeout=WAIT_MS)
                return time.perf_counter() - t0

            async def close_and_shut_down() -> None:
                await page.locator('.lm-MenuBar-itemLabel:text("File")').click(timeout=WAIT_MS)
                await page.locator('.lm-Menu-itemLabel:text("Close and Shut Down Notebook")').click(
                    timeout=WAIT_MS
                )
                await page.locator(".jp-Dialog-button.jp-mod-accept").click(timeout=WAIT_MS)
                await page.locator(NOTEBOOK).wait_for(state="detached", timeout=WAIT_MS)
                # Whatever the page did, no kernel is left running before the next open.
                deadline = time.monotonic() + TIMEOUT
                while True:
                    status, kernels = await bench.http.call(ours, "GET", "/api/kernels")
                    if status == 200 and not kernels:
                        return
                    for kernel in kernels or []:
                        await bench.delete(ours, kernel["id"])
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"kernels left running in our Lab: {kernels}")
                    await asyncio.sleep(0.2)

            plan = ["pool", "local"]  # the untimed first open of each
            for rep in range(opens):
                plan += ["pool", "local"] if rep % 2 == 0 else ["local", "pool"]
            for index, kind in enumerate(plan):
                await wait_quiet(f"before a browser open ({kind})")
                try:
                    seconds = await one(kind)
                    if index >= 2:
                        series[kind].samples.append(seconds)
                    log(f"  browser open {index + 1}/{len(plan)} ({kind}): {ms(seconds)}"
                        f"{' (untimed, the first)' if index < 2 else ''}")  # fmt: skip
                except Exception as error:
                    shot = bench.where / f"open-{index + 1}-{kind}.png"
                    with contextlib.suppress(Exception):
                        await page.screenshot(path=str(shot))
                    series[kind].failures.append(f"open {index + 1}: {str(error)[:200]}")
                    log(f"  browser open {index + 1} ({kind}) FAILED: {str(error)[:300]}")
                await close_and_shut_down()
            version = browser.version
        finally:
            await browser.close()
    return [series["pool"], series["local"]], version


# -- reporting ---------------------------------------------------------------------------------


def machine() -> str:
    return describe_machine(
        ("jupyterlab", "jupyter_server", "jupyter_client", "ipykernel", "tornado", "pyzmq",
         "playwright"),
    )  # fmt: skip


def report(
    times: dict[str, list[float]], opened: list[Opens] | None, skipped: str, iterations: int
) -> list[str]:
    direct = median(times["direct"])
    stock_local = median(times["stock_local"])
    stock_gw = median(times["stock_gateway"])
    lines = [
        "| execute `1+1` round trip | n | median | p90 | vs direct ZMQ | "
        "vs stock jupyter_server local | check |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for key, samples in times.items():
        value = median(samples)
        check = "reply ok"
        if key == "ours_pool":
            ok = value / direct <= TARGET_POOL_RATIO
            check += (f"; target <= {TARGET_POOL_RATIO}x direct: {met(ok)}; "
                      f"{ratio(value, stock_gw)} stock gateway mode")  # fmt: skip
        elif key == "ours_local":
            ok = value <= stock_local * LOCAL_NOISE
            check += f"; target <= stock jupyter_server local (+{LOCAL_NOISE - 1:.0%}): {met(ok)}"
        lines.append(
            f"| {LABELS[key]} | {len(samples)} | {ms(value)} | {ms(p90(samples))} | "
            f"{ratio(value, direct)} | {ratio(value, stock_local)} | {check} |"
        )
    lines.append("")
    if opened is None:
        lines.append(f"kernel ready in the browser: skipped ({skipped})")
        return lines
    local = median(opened[1].samples) if opened[1].samples else None
    lines += [
        "| kernel ready in the browser, launcher click to idle | n | median | p90 | min | max "
        "| vs local | check |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for series in opened:
        s = series.samples or [float("nan")]
        check = f"{len(series.samples)}/{len(series.samples) + len(series.failures)} reached idle"
        if series.failures:
            check += f"; {series.failures[0]}"
        lines.append(
            f"| {series.label} | {len(series.samples)} | {ms(median(s))} | {ms(p90(s))} | "
            f"{ms(min(s))} | {ms(max(s))} | {ratio(median(s), local)} | {check} |"
        )
    return lines


async def run_bench(args: argparse.Namespace, bench: Bench) -> None:
    started = time.perf_counter()
    servers = await setup(bench)
    log(f"set up in {time.perf_counter() - started:.0f} s")
    times = await round_trips(bench, servers, args.iterations)
    skipped = ""
    if not os.access(CHROMIUM, os.X_OK):
        skipped = f"no Debian chromium at {CHROMIUM}; `make install` installs it as root"
    elif not (BUILT / "package.json").exists():
        skipped = "the Lab front end is not built; `make install` builds it"
    opened: list[Opens] | None = None
    version = ""
    if not skipped and args.opens > 0:
        log(f"kernel ready in the browser: {args.opens} opens of each, after one untimed")
        opened, version = await browser_opens(bench, servers.ours, args.opens)
    elif not skipped:
        skipped = "--opens 0"
    elapsed = time.perf_counter() - started

    browser = f"; chromium {version}" if version else ""
    for line in run_lines(machine() + browser, MEASURED, elapsed):
        print(line)
    framing = ", ".join(f"{k}: {v or 'legacy JSON'}" for k, v in sorted(bench.protocols.items()))
    print(f"websocket framing (v1 asked for everywhere): {framing}")
    if NOT_QUIET:
        print(
            f"warning: {len(NOT_QUIET)} waits for the bench's processes to go idle gave up "
            f"({', '.join(sorted(set(NOT_QUIET)))}); those samples may include background work"
        )
    print()
    for line in report(times, opened, skipped, args.iterations):
        print(line)
    pool, local, direct = (median(times[k]) for k in ("ours_pool", "ours_local", "direct"))
    gateway = median(times["gateway"])
    print()
    print(
        f"pool path split (medians): our Lab's relay and the bridge add {ms(pool - gateway)} to "
        f"the gateway's own websocket ({ms(gateway)}), which is {ms(gateway - direct)} over "
        f"direct ZMQ; our Lab's relay alone (local kernel) adds {ms(local - direct)}"
    )
    if opened is not None:
        print(f"spread of the opens: pool {statistics.pstdev(opened[0].samples or [0]) * 1e3:.0f}"
              f" ms, local {statistics.pstdev(opened[1].samples or [0]) * 1e3:.0f} ms "
              "(population standard deviation)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--iterations", type=int, default=200, help="`1+1` round trips per path (200)"
    )
    parser.add_argument(
        "--opens", type=int, default=5, help="browser opens of each kind, 0 to skip (5)"
    )
    args = parser.parse_args()
    if not 1 <= args.iterations <= 5000 or not 0 <= args.opens <= 100:
        parser.error("--iterations must be from 1 to 5000 and --opens from 0 to 100")
    run_main(
        "gpupool-bench-lab-", Bench, lambda bench: run_bench(args, bench),
        "the servers, kernels, browser and stack", limit=900,
    )  # fmt: skip


if __name__ == "__main__":
    main()
