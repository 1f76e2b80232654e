"""`gpupool gateway`: the front door, serving the Jupyter gateway protocol to tenants."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import ssl
from pathlib import Path

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets import Enum, Float, Int, Unicode, default
from traitlets.config import Application

from gpupool.loop import use_uvloop
from gpupool.token_file import read_token_file
from gpupool.wire import MAX_MESSAGE_BYTES

from . import __version__
from .handlers import routes
from .kernels import LEASE_SECONDS
from .log_redaction import log_request, redact_all_logs
from .metrics import Readings, gateway_registry
from .private_files import private_file, private_folder
from .shares import DEFAULT_MAX_BYTES, SWEEP_SECONDS, Shares
from .state import GatewayState
from .store import open_store
from .tenant_limits import DEFAULT_REQUESTS, DEFAULT_WEBSOCKETS
from .tokens import new_token


def secret_file(path: Path, option: str) -> str:
    """A token kept in a 0600 file, made on first use, so restarts keep the same one. Read
    bounded: a path given as the file (such as /dev/zero) must not hang the start."""
    if path.exists():
        try:
            return read_token_file(str(path), option, "token")
        except ValueError as error:
            raise SystemExit(
                f"{error}; put one token in it, or delete it to have a new one made."
            ) from None
    private_folder(path.parent)
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def listen_error(ip: str, port: int, error: OSError) -> str:
    """One line for a port that cannot be listened on."""
    if error.errno == errno.EADDRINUSE:
        return (f"port {port} of {ip} is already in use (another gpupool?); stop that one or "
                "choose another port with --port.")  # fmt: skip
    return f"cannot listen on {ip}:{port}: {error.strerror or error}."


class GatewayApp(Application):
    name = "gpupool-gateway"
    version = __version__
    description = "The gpupool gateway: tenants, GPU kernelspecs, placement and kernel websockets."
    aliases = {
        "ip": "GatewayApp.ip",
        "port": "GatewayApp.port",
        "state-dir": "GatewayApp.state_dir",
        "db": "GatewayApp.db_url",
        "db-url": "GatewayApp.db_url",
        "host-timeout": "GatewayApp.host_timeout",
        "max-message-mb": "GatewayApp.max_message_mb",
        "idle-timeout": "GatewayApp.idle_timeout",
        "idle-action": "GatewayApp.idle_action",
        "certfile": "GatewayApp.certfile",
        "keyfile": "GatewayApp.keyfile",
        "public-url": "GatewayApp.public_url",
        "auth-failures-per-minute": "GatewayApp.auth_failures_per_minute",
        "max-tenant-websockets": "GatewayApp.max_tenant_websockets",
        "max-tenant-requests": "GatewayApp.max_tenant_requests",
        "metrics-token-file": "GatewayApp.metrics_token_file",
        "max-share-mb": "GatewayApp.max_share_mb",
        "share-sweep-seconds": "GatewayApp.share_sweep_seconds",
        "lease-seconds": "GatewayApp.lease_seconds",
    }

    ip = Unicode("127.0.0.1", help="Address to listen on.").tag(config=True)
    port = Int(8765, help="Port to listen on (0 picks a free one).").tag(config=True)
    state_dir = Unicode(".gpupool", help="Folder for the database and the token files.").tag(
        config=True
    )
    db_url = Unicode(
        "", help="Database URL: postgresql+psycopg://user:password@host:5432/name for replicas "
        "sharing one database (or $GPUPOOL_DB_URL); default: SQLite in the state folder.",
    ).tag(config=True)  # fmt: skip

    @default("db_url")
    def _db_url(self) -> str:
        return os.environ.get("GPUPOOL_DB_URL", "")

    admin_token = Unicode(
        help="Admin token. Default: $GPUPOOL_ADMIN_TOKEN or state/admin-token."
    ).tag(config=True)
    join_token = Unicode(
        help="Host join token. Default: $GPUPOOL_JOIN_TOKEN or state/join-token."
    ).tag(config=True)
    host_key = Unicode(
        help="Key the hosts' tokens are derived from, so the database keeps only their digests. "
        "Default: $GPUPOOL_HOST_KEY or state/host-key."
    ).tag(config=True)
    host_timeout = Float(15.0, help="Seconds without a heartbeat before a host is lost.").tag(
        config=True
    )
    certfile = Unicode(
        "", help="TLS certificate (PEM); with --keyfile the gateway serves https."
    ).tag(config=True)
    keyfile = Unicode("", help="TLS private key (PEM) for --certfile.").tag(config=True)
    idle_timeout = Float(
        600.0,
        help="Seconds a kernel may sit idle before its idle action (KERNEL_IDLE_TIMEOUT "
        "overrides it per kernel, within the tenant's bounds).",
    ).tag(config=True)
    idle_action = Enum(
        ["suspend", "cull"], "suspend",
        help="What an idle kernel does: suspend (save variables, give the GPU back, resume on "
        "the next cell) or cull (shut down).",
    ).tag(config=True)  # fmt: skip
    idle_min = Float(1.0, help="Shortest KERNEL_IDLE_TIMEOUT a tenant may ask for.").tag(
        config=True
    )
    idle_max = Float(7 * 24 * 3600.0, help="Longest KERNEL_IDLE_TIMEOUT a tenant may ask for.").tag(
        config=True
    )
    public_url = Unicode(
        "", help="The URL kernels reach this gateway at, given them as GPUPOOL_URL so that "
        "%%gpu works inside pool kernels; default: the URL it listens on.",
    ).tag(config=True)  # fmt: skip
    auth_failures_per_minute = Int(
        100, help="Requests with a wrong tenant or admin token one client address may make in a "
        "minute; past that its wrong tokens get 429 (right ones are served); 0: no limit.",
    ).tag(config=True)  # fmt: skip
    max_share_mb = Float(
        DEFAULT_MAX_BYTES / 1e6, help="Largest notebook snapshot a shared link may hold, in MB "
        "(10^6 bytes); a larger share is refused with 413.",
    ).tag(config=True)  # fmt: skip
    share_sweep_seconds = Float(
        SWEEP_SECONDS, help="How often the snapshot files of shared links that expired (or "
        "were revoked, or whose tenant was) are looked for and deleted, where no live link "
        "holds the same snapshot; seconds.",
    ).tag(config=True)  # fmt: skip
    lease_seconds = Float(
        LEASE_SECONDS, help="With replicas on one database: how long a replica that stops "
        "(killed, or cut off from the database) keeps the kernel starts and suspends it was "
        "doing before another replica takes them over; it renews them every third of this.",
    ).tag(config=True)  # fmt: skip
    max_message_mb = Int(
        MAX_MESSAGE_BYTES >> 20, help="Largest websocket message relayed, in MiB."
    ).tag(config=True)
    max_tenant_websockets = Int(
        DEFAULT_WEBSOCKETS, help="Kernel websockets one tenant may hold open at once; past that "
        "a new one is closed with 1013 and a sentence saying so; 0: no limit.",
    ).tag(config=True)  # fmt: skip
    max_tenant_requests = Int(
        DEFAULT_REQUESTS, help="HTTP requests of one tenant the gateway answers at once; past "
        "that it answers 429 with Retry-After; 0: no limit.",
    ).tag(config=True)  # fmt: skip

    metrics_token = Unicode(
        help="Token Prometheus scrapes /metrics with (the admin token works too). Default: "
        "$GPUPOOL_METRICS_TOKEN, else the file --metrics-token-file, else state/metrics-token."
    ).tag(config=True)
    metrics_token_file = Unicode(
        "", help="File holding the /metrics scrape token (made, 0600, if missing)."
    ).tag(config=True)

    @default("metrics_token")
    def _metrics(self) -> str:
        return os.environ.get("GPUPOOL_METRICS_TOKEN") or secret_file(
            Path(self.metrics_token_file or Path(self.state_dir) / "metrics-token"),
            "--metrics-token-file" if self.metrics_token_file else "the metrics token file",
        )

    @default("admin_token")
    def _admin(self) -> str:
        return os.environ.get("GPUPOOL_ADMIN_TOKEN") or secret_file(
            Path(self.state_dir) / "admin-token", "the admin token file"
        )

    @default("host_key")
    def _host_key(self) -> str:
        return os.environ.get("GPUPOOL_HOST_KEY") or secret_file(
            Path(self.state_dir) / "host-key", "the host key file"
        )

    @default("join_token")
    def _join(self) -> str:
        return os.environ.get("GPUPOOL_JOIN_TOKEN") or secret_file(
            Path(self.state_dir) / "join-token", "the join token file"
        )

    def given(self, name: str) -> bool:
        """Whether the `name` token was given (option, config or environment), not made or
        read from the state folder."""
        return f"{name}_token" in self.config.GatewayApp or bool(
            os.environ.get(f"GPUPOOL_{name.upper()}_TOKEN")
        )

    def make_state(self) -> GatewayState:
        private_folder(Path(self.state_dir))
        if not self.db_url:
            private_file(Path(self.state_dir) / "gateway.db")
        db = open_store(self.db_url or str(Path(self.state_dir) / "gateway.db"))
        # A token given to this gateway becomes every replica's. One from the state folder does
        # too when the database lives there (the default: deleting the file makes a new token);
        # with a shared database (--db-url) it is stored only where the database has none.
        own = not self.db_url
        state = GatewayState(
            db, self.admin_token, self.join_token, self.host_timeout, host_key=self.host_key,
            replace_secrets={n for n in ("admin", "join") if own or self.given(n)},
        )  # fmt: skip
        kernels = state.kernels
        kernels.idle_default, kernels.idle_action = self.idle_timeout, self.idle_action
        kernels.idle_min, kernels.idle_max = self.idle_min, self.idle_max
        if not 0 <= self.auth_failures_per_minute <= 1_000_000:
            raise SystemExit(
                f"--auth-failures-per-minute is {self.auth_failures_per_minute}; use 0 (no "
                "limit) to 1000000."
            )
        state.failed_auth.per_minute = self.auth_failures_per_minute
        for flag, cap in (("--max-tenant-websockets", self.max_tenant_websockets),
                          ("--max-tenant-requests", self.max_tenant_requests)):  # fmt: skip
            if not 0 <= cap <= 1_000_000:
                raise SystemExit(f"{flag} is {cap}; use 0 (no limit) to 1000000.")
        state.limits.websockets = self.max_tenant_websockets
        state.limits.requests = self.max_tenant_requests
        if not 0 < self.max_share_mb <= 10_000:
            raise SystemExit(f"--max-share-mb is {self.max_share_mb}; use above 0, up to 10000.")
        state.shares = Shares(db, Path(self.state_dir) / "shares", int(self.max_share_mb * 1e6))
        if not 0.1 <= self.share_sweep_seconds <= 86_400:
            raise SystemExit(
                f"--share-sweep-seconds is {self.share_sweep_seconds:g}; use 0.1 to 86400."
            )
        state.share_sweep_seconds = self.share_sweep_seconds
        if not 1 <= self.lease_seconds <= 3600:
            raise SystemExit(f"--lease-seconds is {self.lease_seconds:g}; use 1 to 3600.")
        kernels.lease_seconds = self.lease_seconds
        return state

    def make_app(self, state: GatewayState) -> web.Application:
        return web.Application(
            routes(),
            gpupool=state,
            metrics_token=self.metrics_token,
            metrics=gateway_registry(
                Readings(
                    kernel_counts=state.kernels.counts,
                    queue_length=lambda: len(state.kernels.queued()),
                    gpu_types=state.pool.types,
                    open_gpu_seconds=state.kernels.ledger.open_gpu_seconds,
                )
            ),
            log_function=log_request,  # tokens in URIs redacted
            websocket_max_message_size=self.max_message_mb << 20,
            websocket_ping_interval=30,
        )

    async def serve(self) -> tuple[HTTPServer, str, GatewayState]:
        logging.basicConfig(
            level=logging.INFO, format="[%(levelname).1s %(asctime)s %(name)s] %(message)s"
        )
        logging.getLogger("tornado.access").setLevel(logging.WARNING)
        redact_all_logs()
        # The port first: a gateway that cannot listen must not take over the state folder.
        sockets = bind_sockets(self.port, self.ip)
        state = self.make_state()
        tls = None
        if self.certfile:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.certfile, self.keyfile or None)
        server = HTTPServer(self.make_app(state), max_body_size=1 << 20, ssl_options=tls)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        url = f"{'https' if tls else 'http'}://{self.ip}:{port}"
        state.kernels.public_url = self.public_url.rstrip("/") or url
        state.start_watch()
        info = Path(self.state_dir) / "gateway.json"
        private_file(info).write_text(json.dumps({"url": url, "pid": os.getpid()}))
        return server, url, state

    async def run(self) -> None:
        try:
            server, url, _state = await self.serve()
        except OSError as error:
            raise SystemExit(
                f"gpupool gateway: {listen_error(self.ip, self.port, error)}"
            ) from None
        print(f"gateway: {url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()

    def start(self) -> None:
        use_uvloop()
        asyncio.run(self.run())


def main(argv: list[str] | None = None) -> None:
    app = GatewayApp()
    app.initialize(argv)
    app.start()
