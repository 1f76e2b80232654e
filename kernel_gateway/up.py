"""`gpupool up`: the embedded default. A gateway, one local GPU host and JupyterLab pointed at
the gateway, with a demo tenant; Ctrl-C stops all of it, kernels included."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from .app import GatewayApp
from .errors import ApiError

DEMO_TENANT = "demo"


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
        if line.startswith("gpus: "):
            print(line.strip(), flush=True)
    raise SystemExit(f"gpupool up: no {prefix!r} line within {timeout:.0f} s.")


def _drain(proc: subprocess.Popen[str], log_path: Path) -> None:
    """Keep a child's output in its log file (so its errors can be read) and its pipe empty."""
    assert proc.stdout is not None
    with open(log_path, "a") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()


async def run(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir).resolve()
    gateway = GatewayApp(ip="127.0.0.1", port=args.port, state_dir=str(state_dir))
    server, url, state = await gateway.serve()
    children: list[subprocess.Popen[str]] = []
    try:
        host_args = [
            sys.executable, "-m", "gpu_host", "--port", str(args.host_port), "--gateway", url,
            "--join-token", gateway.join_token, "--no-isolate", "--heartbeat-seconds", "2",
            "--state-dir", str(state_dir / "host"),
        ]  # fmt: skip
        host_args += (
            ["--fake-gpus", args.fake_gpus]
            if args.fake_gpus
            else ["--fallback-fake-gpus", "H100:2"]
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
        host = subprocess.Popen(host_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)  # fmt: skip
        children.append(host)
        await _read_line(host, "host", 60)
        asyncio.get_running_loop().run_in_executor(None, _drain, host, state_dir / "host.log")
        deadline = time.monotonic() + 30
        while not state.pool.live() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        try:
            _tenant, token = state.create_tenant(DEMO_TENANT)
        except ApiError:
            token = state.new_token_for(DEMO_TENANT)
        if not args.no_lab:
            lab_token = secrets.token_urlsafe(24)
            lab = subprocess.Popen(
                [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={args.lab_port}",
                 "--ip=127.0.0.1", f"--IdentityProvider.token={lab_token}", f"--gateway-url={url}",
                 f"--GatewayClient.auth_token={token}", "--GatewayClient.request_timeout=120",
                 f"--ServerApp.root_dir={Path.cwd()}", "--allow-root"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            )  # fmt: skip
            children.append(lab)
            lab_url = f"http://127.0.0.1:{args.lab_port}/lab?token={lab_token}"
            await _wait_http(f"http://127.0.0.1:{args.lab_port}/api/status?token={lab_token}", lab)
            asyncio.get_running_loop().run_in_executor(None, _drain, lab, state_dir / "lab.log")
            print(f"lab: {lab_url}", flush=True)
        print(f"gateway: {url}", flush=True)
        print(f"token: {token}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            if any(p.poll() is not None for p in children):
                print("gpupool up: a part stopped unexpectedly; stopping the rest.", flush=True)
                break
            try:
                await asyncio.wait_for(stop.wait(), 1)
            except asyncio.TimeoutError:
                pass
    finally:
        for proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(children):
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()
        print("gpupool up: stopped", flush=True)


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
    parser.add_argument("--state-dir", default=".gpupool", help="where state is kept")
    asyncio.run(run(parser.parse_args(argv)))
