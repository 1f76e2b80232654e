"""`gpupool host`: the GPU host agent, a jupyter_server that serves this machine's GPU kernels."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import resource
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from jupyter_server import serverapp
from jupyter_server.serverapp import ServerApp
from tornado.ioloop import IOLoop
from traitlets import Bool, Dict, Float, Int, List, Unicode, default

from gpupool.loop import use_uvloop
from gpupool.token_file import read_token_file

from . import __version__, kernel_python
from .allocator import GpuAllocator
from .auth import HostTokenIdentityProvider
from .gateway_link import GatewayLink
from .gpus import InventoryError, describe
from .kernels import HostKernelManager, HostKernelSpecManager
from .nvml import choose_inventory
from .status import HostStatus
from .tenants import TenantSpaces
from .websocket import HostWebsocketConnection


class HostAgent(ServerApp):
    """Serves the kernels of one GPU machine to the gpupool gateway."""

    name = "gpupool-host"
    version = __version__
    description = (
        "The gpupool GPU host agent: finds this machine's GPUs, starts kernels pinned to them, "
        "keeps some warm, and serves them over the Jupyter kernels API to the gateway."
    )
    default_services = ("api", "kernels", "kernelspecs")  # type: ignore[assignment]
    examples = """
gpupool host --fake-gpus H100:2                   # a host with two fake H100s, for trying out
gpupool host --gateway https://gw:8888 --public-url http://10.0.0.5:8889
                                                  # join a gateway ($GPUPOOL_JOIN_TOKEN)
gpupool host --help-all                           # every option of every part
"""
    subcommands: dict[str, Any] = {}  # jupyter_server's (list, stop, password) are not ours
    # Every class an option above or `--help-all` may name (traitlets looks each one up here).
    classes = [*ServerApp.classes, HostKernelManager, HostKernelSpecManager]

    aliases = Dict(
        {
            **serverapp.aliases,
            "fake-gpus": "HostAgent.fake_gpus",
            "fallback-fake-gpus": "HostAgent.fallback_fake_gpus",
            "host-token": "HostAgent.host_token",
            "gateway": "HostAgent.gateway_url",
            "join-token": "HostAgent.join_token",
            "join-token-file": "HostAgent.join_token_file",
            "public-url": "HostAgent.public_url",
            "heartbeat-seconds": "HostAgent.heartbeat_seconds",
            "kernel-python": "HostAgent.kernel_python",
            "state-dir": "HostAgent.state_dir",
            "warm-per-shape": "HostKernelManager.warm_per_shape",
            "max-message-mb": "HostAgent.max_message_mb",
            "max-websockets-per-kernel": "HostKernelManager.max_websockets_per_kernel",
            "max-websockets-per-tenant": "HostKernelManager.max_websockets_per_tenant",
        }
    )
    flags = Dict(
        {
            **serverapp.flags,
            "isolate": (
                {"HostAgent": {"isolate": True}},
                "Run each tenant's kernels as its own user.",
            ),
            "no-isolate": (
                {"HostAgent": {"isolate": False}},
                "Run all kernels as the agent's user.",
            ),
        }
    )

    fake_gpus = Unicode(
        "",
        help="Serve fake GPUs instead of NVML's, e.g. 'H100:4,A10G:2' (for machines without one).",
    ).tag(config=True)
    fallback_fake_gpus = Unicode(
        "", help="Fake GPUs to serve when NVML finds none, e.g. 'H100:2' (the embedded default)."
    ).tag(config=True)
    host_token = Unicode(
        help="Token the gateway must send (Authorization: token T). Default: $GPUPOOL_HOST_TOKEN, "
        "else a new random one, printed at start."
    ).tag(config=True)
    gateway_url = Unicode("", help="The gateway to register with, e.g. https://gw:8888.").tag(
        config=True
    )
    join_token = Unicode(
        help="The cluster join token to register with the gateway. Default: $GPUPOOL_JOIN_TOKEN, "
        "else --join-token-file. On a command line every user of the machine can read it (in "
        "/proc/PID/cmdline): prefer the variable or the file.",
    ).tag(config=True)
    join_token_file = Unicode(
        "", help="A file (mode 0600) holding the join token, such as the gateway's "
        "state/join-token."
    ).tag(config=True)  # fmt: skip
    public_url = Unicode(
        "",
        help="The URL the gateway should use to reach this agent. Default: from --ip and --port.",
    ).tag(config=True)
    heartbeat_seconds = Float(3.0, help="Seconds between heartbeats to the gateway.").tag(
        config=True
    )
    gateway_max_backoff = Float(
        30.0, help="Longest wait between retries while the gateway is unreachable, in seconds."
    ).tag(config=True)
    isolate = Bool(
        help="Run each tenant's kernels as its own unprivileged Unix user. Default: on when root "
        "(with the kernel venv, see --kernel-python); off, with one line saying so, otherwise."
    ).tag(config=True)
    kernel_python = Unicode(
        help="The Python (with ipykernel) that runs kernels. Under --isolate, tenants' users must "
        "be able to run it. Default: under --isolate, /opt/gpupool/kernel-venv/bin/python (built "
        "by `make install` or at the first start); else this agent's Python."
    ).tag(config=True)
    state_dir = Unicode(".gpupool/host", help="Where tenants' working folders live.").tag(
        config=True
    )
    max_message_mb = Int(
        10,
        help="Largest websocket message a client may send to a kernel, in MiB; a bigger one "
        "closes its websocket with 1009, naming this limit.",
    ).tag(config=True)
    kernel_extensions = List(
        Unicode(), ["jupyter_ext"],
        help="IPython extensions every kernel loads at start; jupyter_ext makes %%gpu work with "
        "no %load_ext (a kernel Python without it starts anyway, with a warning in its log).",
    ).tag(config=True)  # fmt: skip

    @default("host_token")
    def _default_host_token(self) -> str:
        return os.environ.get("GPUPOOL_HOST_TOKEN") or secrets.token_hex(32)

    @default("join_token")
    def _default_join_token(self) -> str:
        if os.environ.get("GPUPOOL_JOIN_TOKEN"):
            return os.environ["GPUPOOL_JOIN_TOKEN"]
        if self.join_token_file:
            try:
                return read_token_file(self.join_token_file, "--join-token-file", "join token")
            except ValueError as error:
                self.log.critical("%s", error)
                self.exit(2)
        return ""

    @default("isolate")
    def _default_isolate(self) -> bool:
        return os.geteuid() == 0

    @default("kernel_python")
    def _default_kernel_python(self) -> str:
        return sys.executable

    def init_isolation(self) -> None:
        """Isolate wherever it can be (as root, with a kernel Python tenants' users can run);
        say in one line at start which it is."""
        chosen = "isolate" in self.config.HostAgent
        why, fix = "", "run the agent as root to isolate them"
        if self.isolate and "kernel_python" not in self.config.HostAgent:
            try:
                self.kernel_python = kernel_python.ensure()
            except kernel_python.KernelPythonError as error:
                if chosen:
                    self.log.critical("cannot isolate tenants: %s", error)
                    self.exit(2)
                self.isolate = False
                why = str(error)
        elif not self.isolate:
            why = "--no-isolate" if chosen else "the agent does not run as root"
            if chosen and os.geteuid() == 0:
                fix = "leave out --no-isolate to isolate them"
        if self.isolate:
            line = f"on: each tenant's kernels run as its own user gp-TENANT ({self.kernel_python})"
        else:
            user = pwd.getpwuid(os.getuid()).pw_name
            line = (
                f"OFF ({why}): every tenant's kernels run as {user} and can read each other's "
                f"files; {fix}"
            )
        print(f"isolation: {line}", flush=True)

    @default("kernel_manager_class")
    def _default_km(self) -> type:
        return HostKernelManager

    @default("kernel_spec_manager_class")
    def _default_ksm(self) -> type:
        return HostKernelSpecManager

    @default("identity_provider_class")
    def _default_identity(self) -> type:
        return HostTokenIdentityProvider

    @default("kernel_websocket_connection_class")
    def _default_ws(self) -> type:
        return HostWebsocketConnection

    @default("extra_services")
    def _default_extra_services(self) -> list[str]:
        return ["gpu_host.handlers"]

    @default("open_browser")
    def _default_open_browser(self) -> bool:
        return False

    @default("ip")
    def _default_ip(self) -> str:
        return "127.0.0.1"

    @default("no_browser_open_file")
    def _default_no_browser_open_file(self) -> bool:
        return True

    @default("allow_root")
    def _default_allow_root(self) -> bool:
        return True

    def find_server_extensions(self) -> None:
        """The agent is an API for the gateway: no JupyterLab or other server extension."""
        self.jpserver_extensions = {}

    def init_signal(self) -> None:
        super().init_signal()
        # A service stops cleanly on SIGINT too, with or without a terminal: no prompt, and
        # no skipping of kernel shutdown (jupyter_server only handles SIGINT on a tty).
        signal.signal(signal.SIGINT, self._signal_stop)

    def init_configurables(self) -> None:
        # Kernels must never be slowed or dropped for printing fast.
        self.config.ZMQChannelsWebsocketConnection.limit_rate = False
        if "join_token" in self.config.HostAgent:
            self.log.warning(
                "the join token is on the command line, where every user of this machine can "
                "read it; pass it in $GPUPOOL_JOIN_TOKEN or --join-token-file instead"
            )
        self.init_isolation()
        self.config.HostKernelSpecManager.kernel_python = self.kernel_python
        self.config.HostKernelSpecManager.kernel_extensions = list(self.kernel_extensions)
        try:
            inventory, line = choose_inventory(self.fake_gpus or None)
            if inventory is None and self.fallback_fake_gpus:
                why = line
                inventory, _ = choose_inventory(self.fallback_fake_gpus)
                line = f"{why}; using fake GPUs {self.fallback_fake_gpus} instead"
        except InventoryError as error:
            self.log.critical("%s", error)
            self.exit(2)
        super().init_configurables()
        # The agent's own modules log through the server's handlers and format.
        ours = logging.getLogger("gpu_host")
        ours.handlers, ours.propagate = list(self.log.handlers), False
        ours.setLevel(self.log.level)
        self.inventory = inventory or _no_gpus()
        print(f"gpus: {line}; {describe(self.inventory.devices())}", flush=True)
        self.allocator = GpuAllocator(self.inventory.devices())
        runtime = Path(tempfile.gettempdir()) / f"gpupool-{os.getuid()}-{os.getpid()}"
        _remove_stale_runtimes(runtime.parent, os.getuid())
        self.spaces = TenantSpaces(Path(self.state_dir), runtime, self.isolate)
        self.host_kernels = cast(HostKernelManager, self.kernel_manager)
        self.host_kernels.attach(self.allocator, self.spaces, raise_open_files_limit())
        self.host_identity = cast(HostTokenIdentityProvider, self.identity_provider)
        self.host_identity.token = self.host_token
        self.host_identity.accept(self.host_token)

    def init_webapp(self) -> None:
        super().init_webapp()
        url = self.public_url or f"http://{self.ip or '127.0.0.1'}:{self.port}"
        self.status = HostStatus(
            self.inventory, self.allocator, self.host_kernels, url, isolates=self.isolate
        )
        self.web_app.settings["gpupool_status"] = self.status
        self.web_app.settings["websocket_ping_interval"] = 30
        self.web_app.settings["websocket_ping_timeout"] = 30
        # Tornado's pings above end with their websocket; jupyter_server's own (a second ping
        # every 30 s) kept every closed websocket, handler and buffers, for up to 30 s more.
        self.web_app.settings["ws_ping_interval"] = 0
        self.web_app.settings["websocket_max_message_size"] = self.max_message_mb << 20

    def start_app(self) -> None:
        super().start_app()
        # The port is bound only now: with --port 0, the one the system chose is the real one.
        self.status.url = self.public_url or f"http://{self.ip or '127.0.0.1'}:{self.port}"
        IOLoop.current().add_callback(self._start_background)
        print(f"host: {self.status.url}", flush=True)
        if not os.environ.get("GPUPOOL_HOST_TOKEN") and "host_token" not in self.config.HostAgent:
            print(f"token: {self.host_token}", flush=True)

    async def _start_background(self) -> None:
        self.host_kernels.start_background()
        self._link: asyncio.Task[None] | None = None
        if self.gateway_url:
            link = GatewayLink(
                self.gateway_url,
                self.join_token,
                self.status,
                self.host_identity,
                self.heartbeat_seconds,
                self.gateway_max_backoff,
            )
            self._link = asyncio.get_running_loop().create_task(link.run())

    async def cleanup_kernels(self) -> None:
        link = getattr(self, "_link", None)
        if link is not None:
            link.cancel()
        await super().cleanup_kernels()
        # Sockets and connection files of kernels that are all gone now.
        shutil.rmtree(self.spaces.runtime_dir, ignore_errors=True)


def raise_open_files_limit() -> int:
    """Raise this process's open-file limit (soft) to its ceiling (hard), which its kernels
    inherit, and return it: every kernel websocket holds about 16 files, and a soft limit of
    1024 ran out at about 60 websockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def _remove_stale_runtimes(parent: Path, uid: int) -> None:
    """Remove the runtime folders of agents that died without cleaning up (SIGKILL)."""
    for folder in parent.glob(f"gpupool-{uid}-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


class _NoGpus:
    source = "none"

    def devices(self) -> list[Any]:
        return []


def _no_gpus() -> _NoGpus:
    return _NoGpus()


def main(argv: list[str] | None = None) -> None:
    use_uvloop()
    HostAgent.launch_instance(argv=argv)
