"""`gpupool up`: the embedded default. A gateway, one local GPU host and JupyterLab with a demo
tenant; Ctrl-C stops all of it, kernels included.

Lab runs in hybrid mode by default: the user's local kernels as ever, and one kernelspec per
pool shape beside them, started through the gateway by the `gpupool-provisioner` (the tenant's
token in Lab's environment, never in the browser). `--lab-mode gateway` runs stock JupyterLab
with `--gateway-url` instead, where every kernel is the pool's."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from gpupool.loop import use_uvloop
from gpupool.wire import ENDED

from .app import GatewayApp, listen_error
from .errors import ApiError
from .private_files import private_log
from .state import GatewayState
from .store import Kernel, Tenant

DEMO_TENANT = "demo"
ISOLATED_HOMES = Path("/var/lib/gpupool")


async def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """The value of the first `prefix: value` line a child prints, echoing its other lines."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line:
            raise SystemExit(f"gpupool up: a part stopped before saying {prefix!r}; see above.")
        if line.startswith(prefix + ": "):
            return line.split(": ", 1)[1].strip()
        if line.startswith(("gpus: ", "isolation: ", "kernel python: ")):
            print(line.strip(), flush=True)
    raise SystemExit(f"gpupool up: no {prefix!r} line within {timeout:.0f} s.")


def _drain(proc: subprocess.Popen[str], log_path: Path, hide: tuple[str, ...] = ()) -> None:
    """Keep a child's output in its log file (so its errors can be read) and its pipe empty.
    The secrets in `hide` show as their first 4 characters: Lab logs the whole environment of
    every kernel it asks the gateway for (`GatewayKernelManager started kernel: ..., args:`),
    its own token and the tenant's among it."""
    assert proc.stdout is not None
    with os.fdopen(private_log(log_path), "a") as log:
        for line in proc.stdout:
            for secret in hide:
                line = line.replace(secret, secret[:4] + "…")
            log.write(line)
            log.flush()


def host_state_dir(state_dir: Path) -> Path:
    """Where the local host keeps its tenants' working folders. As root (isolating), tenants'
    users must be able to pass through every folder above theirs, which the private state
    folder forbids: then a folder of /var/lib/gpupool, one per state folder, is used."""
    if os.geteuid() != 0:
        return state_dir / "host"
    name = "up-" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    folder = ISOLATED_HOMES / name
    folder.mkdir(parents=True, exist_ok=True)
    for path in (ISOLATED_HOMES, folder):
        path.chmod(0o711)  # tenants pass through to their own folder, and list nothing
    return folder


async def delete_kernels(state: GatewayState) -> None:
    """Shut down, through the gateway, every kernel not ended yet (suspended ones too, with
    their checkpoints), while the host still answers."""
    with state.db() as s:
        rows = s.scalars(select(Kernel).where(Kernel.state.not_in(ENDED))).all()
        tenants = {t.id: t for t in s.scalars(select(Tenant)).all()}
    done = await asyncio.gather(
        *(state.kernels.delete(tenants[k.tenant_id], k.id) for k in rows), return_exceptions=True
    )
    for kernel, error in zip(rows, done, strict=True):
        if isinstance(error, BaseException):
            print(f"gpupool up: could not shut down kernel {kernel.id}: {error}", flush=True)


async def run(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir).resolve()
    made_state = not state_dir.exists()
    database = {"db_url": args.db_url} if args.db_url else {}
    gateway = GatewayApp(ip="127.0.0.1", port=args.port, state_dir=str(state_dir), **database)
    try:
        server, url, state = await gateway.serve()
    except OSError as error:
        if made_state:  # nothing of a start that did not happen is left behind
            shutil.rmtree(state_dir, ignore_errors=True)
        raise SystemExit(f"gpupool up: {listen_error('127.0.0.1', args.port, error)}") from None
    host: subprocess.Popen[str] | None = None
    lab: subprocess.Popen[str] | None = None
    try:
        host_args = [
            sys.executable, "-m", "gpu_host", "--port", str(args.host_port), "--gateway", url,
            "--heartbeat-seconds", "2", "--state-dir", str(host_state_dir(state_dir)),
        ]  # fmt: skip
        host_args += (
            ["--fake-gpus", args.fake_gpus]
            if args.fake_gpus
            else ["--fallback-fake-gpus", "H100:2"]
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
        # Secrets go in the environment, which only their process's user may read, never on a
        # command line, which every user can (/proc/PID/cmdline). The host's own token is
        # unused here: set, it is not printed (so not in host.log).
        host_env = {**env, "GPUPOOL_JOIN_TOKEN": gateway.join_token,
                    "GPUPOOL_HOST_TOKEN": secrets.token_hex(32)}  # fmt: skip
        # Each child in its own session: a terminal's Ctrl-C reaches this process alone, which
        # then stops them in order (Lab, the gateway's kernels, the host).
        host = subprocess.Popen(host_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=host_env, start_new_session=True,
                                umask=0o077)  # fmt: skip
        await _read_line(host, "host", 180)
        asyncio.get_running_loop().run_in_executor(None, _drain, host, state_dir / "host.log")
        deadline = time.monotonic() + 30
        while not state.pool.live() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        try:
            # The demo tenant is the operator's own, who runs this stack: not a second party.
            _tenant, token = state.create_tenant(DEMO_TENANT, allow_shared_host=True)
        except ApiError:
            token = state.new_token_for(DEMO_TENANT)
        if not args.no_lab:
            lab_token = secrets.token_urlsafe(24)
            lab_args = [sys.executable, "-m", "jupyterlab", "--no-browser",
                        f"--port={args.lab_port}", "--ip=127.0.0.1",
                        f"--ServerApp.root_dir={Path.cwd()}", "--allow-root"]  # fmt: skip
            if args.lab_mode == "gateway":
                lab_env = {**env, "JUPYTER_TOKEN": lab_token, "JUPYTER_GATEWAY_AUTH_TOKEN": token}
                lab_args += [f"--gateway-url={url}", "--GatewayClient.request_timeout=120"]
            else:
                pool_env = await hybrid_env(state_dir, url, token)
                lab_env = {**env, "JUPYTER_TOKEN": lab_token, **pool_env}
            lab = subprocess.Popen(
                lab_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=lab_env, start_new_session=True,
            )  # fmt: skip
            lab_url = f"http://127.0.0.1:{args.lab_port}/lab?token={lab_token}"
            await _wait_http(f"http://127.0.0.1:{args.lab_port}/api/status?token={lab_token}", lab)
            asyncio.get_running_loop().run_in_executor(
                None, _drain, lab, state_dir / "lab.log", (lab_token, token)
            )
            print(f"lab: {lab_url}", flush=True)
        print(f"gateway: {url}", flush=True)
        print(f"token: {token}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        children = [p for p in (host, lab) if p is not None]
        while not stop.is_set():
            if any(p.poll() is not None for p in children):
                print("gpupool up: a part stopped unexpectedly; stopping the rest.", flush=True)
                break
            try:
                await asyncio.wait_for(stop.wait(), 1)
            except asyncio.TimeoutError:
                pass
    finally:
        # Lab first (it shuts its kernels down through the gateway), then the gateway's own
        # kernels and checkpoints, while the host still answers; the host last.
        await _stop(lab)
        server.stop()  # no new requests; the kernels' own calls to the host go on
        if host is not None and host.poll() is None:
            await delete_kernels(state)
        await _stop(host)
        print("gpupool up: stopped", flush=True)


async def hybrid_env(state_dir: Path, url: str, token: str) -> dict[str, str]:
    """What Lab needs to start pool kernels beside local ones: the gateway and token for the
    provisioner and the server extension, and the pool's kernelspecs, synced now by `gpupool
    kernelspec sync` (so the first page lists them) into the state folder (so they leave with
    it), on Lab's JUPYTER_PATH. (A command, not an import: the packages meet over the wire.)"""
    data = state_dir / "jupyter"
    kernels = data / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    env = {"GPUPOOL_URL": url, "GPUPOOL_TOKEN": token, "GPUPOOL_KERNELSPEC_DIR": str(kernels)}
    paths = [str(data), *filter(None, os.environ.get("JUPYTER_PATH", "").split(os.pathsep))]
    env["JUPYTER_PATH"] = os.pathsep.join(paths)
    sync = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gpupool.cli", "kernelspec", "sync"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if sync.returncode == 0:
        print(f"gpupool up: Lab lists local kernels beside the pool's: {sync.stdout.strip()}",
              flush=True)  # fmt: skip
    else:  # Lab still starts, with local kernels; this says why there are no others
        print(f"gpupool up: no pool kernels in Lab: {sync.stderr.strip()}", flush=True)
    return env


async def _stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    from tornado.httpclient import AsyncHTTPClient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                "gpupool up: JupyterLab exited while starting; run it alone to see why."
            )
        try:
            await AsyncHTTPClient().fetch(url, request_timeout=5)
            return
        except Exception:
            await asyncio.sleep(0.3)
    raise SystemExit(f"gpupool up: JupyterLab did not answer within {timeout:.0f} s.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gpupool up", description=__doc__)
    parser.add_argument("--port", type=int, default=8765, help="gateway port (0: any free one)")
    parser.add_argument("--host-port", type=int, default=8766, help="local GPU host port")
    parser.add_argument("--lab-port", type=int, default=8888, help="JupyterLab port")
    parser.add_argument("--fake-gpus", default="", help="serve fake GPUs, e.g. H100:2")
    parser.add_argument("--no-lab", action="store_true", help="start the gateway and host only")
    parser.add_argument(
        "--lab-mode", choices=("hybrid", "gateway"), default="hybrid",
        help="hybrid (default): local kernels and every pool shape side by side; gateway: stock "
        "JupyterLab with --gateway-url, every kernel the pool's",
    )  # fmt: skip
    parser.add_argument("--state-dir", default=".gpupool", help="where state is kept")
    parser.add_argument(
        "--db-url", default="", help="the gateway's database (postgresql+psycopg://...); default: "
        "$GPUPOOL_DB_URL, else SQLite in the state folder",
    )  # fmt: skip
    # As `gpupool host` and `gpupool gateway` (traitlets) do; this command has no more options.
    parser.add_argument("--help-all", action="help", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    use_uvloop()
    asyncio.run(run(args))
