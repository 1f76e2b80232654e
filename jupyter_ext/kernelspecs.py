"""One local kernelspec per GPU shape of the pool, in the user's Jupyter data folder, so that
every client that starts kernels by kernelspec (JupyterLab, `jupyter execute`, nbclient,
papermill, VS Code) lists each pool shape ("Python 3 · H100 x1", with a multiplication sign)
beside the local kernels.

Each names the `gpupool-provisioner` kernel provisioner and its shape; none holds the gateway's
URL or token (the provisioner finds them at start, see `credentials.py`). The pool's CPU
kernelspec (`python3`) is not installed: it would hide the user's own local `python3`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir

from gpupool.wire import GPU_KERNEL_PREFIX

from . import credentials
from .errors import GatewayError
from .gateway_api import GatewayApi

PROVISIONER = "gpupool-provisioner"


FOLDER_ENV = "GPUPOOL_KERNELSPEC_DIR"


def kernels_dir() -> Path:
    """Where the pool kernelspecs go: $GPUPOOL_KERNELSPEC_DIR (`gpupool up` keeps its own in
    its state folder, on its Lab's JUPYTER_PATH), else the user's Jupyter data folder."""
    folder = os.environ.get(FOLDER_ENV, "")
    return Path(folder) if folder else Path(jupyter_data_dir()) / "kernels"


def kernelspec(name: str, gpupool: dict[str, Any]) -> dict[str, Any]:
    """The kernel.json of pool shape `name`. `argv` runs the bridge on its own (for clients
    that launch argv without provisioners); jupyter_client uses the provisioner instead."""
    gpu_type, count = gpupool.get("gpu_type", "?"), gpupool.get("gpu_count", "?")
    shape = {k: gpupool[k] for k in ("gpu_type", "gpu_count", "memory_gb") if k in gpupool}
    bridge = ["-m", "jupyter_ext.kernel_bridge", "--kernel-name", name, "-f", "{connection_file}"]
    return {
        "argv": [sys.executable, *bridge],
        "display_name": f"Python 3 · {gpu_type} ×{count}",  # noqa: RUF001
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": PROVISIONER,
                "config": {"kernel_name": name},
            },
            "gpupool": shape,
        },
    }


def installed(folder: Path | None = None) -> dict[str, Path]:
    """The pool kernelspecs this module installed earlier, by name."""
    found: dict[str, Path] = {}
    folder = folder or kernels_dir()
    if not folder.is_dir():
        return found
    for spec in folder.glob(f"{GPU_KERNEL_PREFIX}*/kernel.json"):
        try:
            meta = json.loads(spec.read_text()).get("metadata", {})
        except (OSError, ValueError):
            continue
        if meta.get("kernel_provisioner", {}).get("provisioner_name") == PROVISIONER:
            found[spec.parent.name] = spec.parent
    return found


def sync_kernelspecs(url: str, token: str, folder: Path | None = None) -> list[str]:
    """Install a kernelspec for every GPU shape the gateway offers now and remove those of
    shapes that are gone; returns the names installed. CredentialsError if the gateway refuses
    (the message names the problem, never the token)."""
    try:
        reply = GatewayApi(url, token).call("GET", "/api/kernelspecs", timeout=15) or {}
    except GatewayError as error:
        raise credentials.CredentialsError(credentials.explain(error, url)) from None
    offered: dict[str, dict[str, Any]] = {}
    for name, spec in (reply.get("kernelspecs") or {}).items():
        if not isinstance(name, str) or not name.startswith(GPU_KERNEL_PREFIX) or "/" in name:
            continue
        meta = ((spec or {}).get("spec") or {}).get("metadata") or {}
        offered[name] = dict(meta.get("gpupool") or {})
    folder = folder or kernels_dir()
    for name, gpupool in offered.items():
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        text = json.dumps(kernelspec(name, gpupool), indent=1, ensure_ascii=False) + "\n"
        if not (target / "kernel.json").exists() or (target / "kernel.json").read_text() != text:
            (target / "kernel.json").write_text(text)
    for name, path in installed(folder).items():
        if name not in offered:
            shutil.rmtree(path, ignore_errors=True)
    return sorted(offered)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="gpupool kernelspec",
        description="Pool kernelspecs in your Jupyter data folder: one per GPU shape, started "
        "through the gateway by the gpupool-provisioner kernel provisioner.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sync = sub.add_parser("sync", help="install one kernelspec per pool shape, remove gone ones")
    sync.add_argument("--url", default="", help="the gateway (default: $GPUPOOL_URL, login file)")
    sub.add_parser("list", help="the pool kernelspecs installed here")
    # As `gpupool host` and `gpupool gateway` (traitlets) do; this command has no more options.
    parser.add_argument("--help-all", action="help", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.action == "list":
        for name, path in sorted(installed().items()):
            print(f"{name}\t{path}")
        return
    try:
        url, token = credentials.resolve(args.url)
        names = sync_kernelspecs(url, token)
    except credentials.CredentialsError as error:
        print(f"gpupool kernelspec sync: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{len(names)} pool kernelspec(s) in {kernels_dir()}: {', '.join(names) or 'none'}")
