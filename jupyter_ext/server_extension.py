"""The Jupyter server extension: REST routes under /gpupool/ for the Lab front end.

The routes call the gpupool gateway with the tenant's token, which stays in this server: the
browser sees shapes, kernel states, costs and usage, never the token. Where the gateway's URL and
token come from, first found wins: `c.GpupoolLab.gateway_url` / `c.GpupoolLab.token`, then
GPUPOOL_URL / GPUPOOL_TOKEN, then this server's own `--gateway-url` and
`GatewayClient.auth_token` (gateway mode, as `gpupool up` runs Lab).

It also turns Nagle's algorithm off on every kernel websocket this server serves (local and pool
kernels, and gateway mode's): see `NoDelayConnection`.

`/gpupool/preferences` takes what of Lab's "GPU pool" settings this server applies itself: the
idle timeout, given as KERNEL_IDLE_TIMEOUT to every kernel a session starts from then on (the
pool provisioner and, in gateway mode, jupyter_server's gateway client pass it to the gateway)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.parse
from datetime import datetime, timedelta, timezone
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import ensure_async, url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Float, Unicode
from traitlets.config import Configurable

from gpupool.wire import iso, parse_iso

from .pool_websocket import PoolKernelConnection, pool_target, watch_pool_activity

URL_ENV = "GPUPOOL_URL"
TOKEN_ENV = "GPUPOOL_TOKEN"
KERNEL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_GATEWAY_BYTES = 8 * 1024 * 1024  # the largest gateway answer this server reads
USAGE_DAYS = 30
SETTINGS_KEY = "gpupool_lab"
PREFERENCES_KEY = "gpupool_preferences"
MAX_PREFERENCES_BYTES = 4096  # a PUT /gpupool/preferences body larger than this is refused
MAX_IDLE_TIMEOUT = 7 * 24 * 3600  # the gateway's own ceiling; a tenant's bounds may be narrower


class GpupoolLab(Configurable):
    """How this Jupyter server reaches the gpupool gateway."""

    gateway_url = Unicode("", help="The gateway's URL; else GPUPOOL_URL.").tag(config=True)
    token = Unicode("", help="A tenant token; else GPUPOOL_TOKEN. Never sent to the browser.").tag(
        config=True
    )
    request_timeout = Float(10.0, help="Seconds to wait for the gateway.").tag(config=True)
    max_share_mb = Float(
        64.0, help="The largest notebook file this server reads to share, in MB (10^6 bytes); "
        "the gateway has its own limit (50 MB by default).",
    ).tag(config=True)  # fmt: skip


class GatewayUnavailable(Exception):
    """The gateway could not answer; `status` is this server's answer to the browser."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class Gateway:
    """The gateway's REST API, as the Lab routes call it (asynchronously)."""

    def __init__(self, config: GpupoolLab, serverapp: Any) -> None:
        self.config = config
        self.serverapp = serverapp
        self.clients: dict[int, AsyncHTTPClient] = {}  # by the largest answer each reads

    def target(self) -> tuple[str, str]:
        url = self.config.gateway_url or os.environ.get(URL_ENV, "")
        token = self.config.token or os.environ.get(TOKEN_ENV, "")
        if not url or not token:
            client = _gateway_client(self.serverapp)
            if client is not None:
                url = url or client.url or ""
                token = token or client.auth_token or ""
        if not url or not token:
            raise GatewayUnavailable(
                503,
                "not configured",
                "This Jupyter server does not know the gpupool gateway: set GPUPOOL_URL and "
                "GPUPOOL_TOKEN in its environment (`gpupool up` prints both), or "
                "c.GpupoolLab.gateway_url and c.GpupoolLab.token, and restart it. Local kernels "
                "work as before.",
            )
        return url.rstrip("/"), token

    async def get(self, path: str) -> Any:
        return await self.call("GET", path)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        max_bytes: int = MAX_GATEWAY_BYTES,
        timeout: float | None = None,
        passthrough: tuple[int, ...] = (),
    ) -> Any:
        """The gateway's JSON answer to `method path` (with `body` as JSON). An error status in
        `passthrough` comes back as itself with the gateway's own message (reason "refused")."""
        url, token = self.target()
        timeout = timeout or self.config.request_timeout
        request = HTTPRequest(
            url + path,
            method=method,
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
            body=None if body is None else json.dumps(body),
            request_timeout=timeout,
            connect_timeout=self.config.request_timeout,
            validate_cert=True,
        )
        client = self.clients.get(max_bytes)
        if client is None:  # made on the server's own loop, on first use
            client = AsyncHTTPClient(force_instance=True, max_body_size=max_bytes)
            self.clients[max_bytes] = client
        try:
            response = await client.fetch(request)
        except HTTPClientError as error:
            body_bytes = error.response.body if error.response is not None else b""
            if error.code in passthrough:
                detail = _scrub(_message(body_bytes), token)
                raise GatewayUnavailable(error.code, "refused", detail) from None
            raise _from_status(url, error.code, _message(body_bytes), token) from None
        except (OSError, TimeoutError) as error:
            raise GatewayUnavailable(
                502,
                "gateway unreachable",
                f"The gpupool gateway at {url} does not answer ({_scrub(str(error), token)}). "
                "GPU kernels are unavailable until it does; local kernels work as before.",
            ) from None
        try:
            return json.loads(response.body)
        except ValueError:
            raise GatewayUnavailable(
                502, "bad gateway answer", f"The gpupool gateway at {url} answered no JSON."
            ) from None


_SYNCING = threading.Lock()  # one kernelspec sync at a time


def _installed_pool_specs() -> set[str]:
    from .kernelspecs import installed

    return set(installed())


def _gateway_client(serverapp: Any) -> Any:
    """This server's GatewayClient when it runs in gateway mode, else None."""
    try:
        from jupyter_server.gateway.gateway_client import GatewayClient
    except ImportError:  # pragma: no cover - every jupyter_server 2 has it
        return None
    if not GatewayClient.initialized():
        return None
    client = GatewayClient.instance()
    return client if client.gateway_enabled else None


def _from_status(url: str, status: int, detail: str, token: str) -> GatewayUnavailable:
    detail = _scrub(detail, token)
    if status in (401, 403):
        return GatewayUnavailable(
            502,
            "token refused",
            f"The gpupool gateway at {url} refused this server's token ({status}): set "
            "GPUPOOL_TOKEN to a valid tenant token (`gpupool tenant create NAME` makes one) "
            "and restart Jupyter.",
        )
    if status == 402:
        return GatewayUnavailable(402, "budget reached", f"GPU budget reached: {detail}")
    if status == 404:
        return GatewayUnavailable(404, "not found", detail or "No such kernel on the gateway.")
    if status == 599:
        return GatewayUnavailable(
            502,
            "gateway unreachable",
            f"The gpupool gateway at {url} does not answer ({detail or 'timeout'}). GPU "
            "kernels are unavailable until it does; local kernels work as before.",
        )
    return GatewayUnavailable(
        502,
        "gateway error",
        f"The gpupool gateway at {url} answered {status}: {detail or 'no detail'}. Try again "
        "shortly; local kernels work as before.",
    )


def _message(body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:300]
    if isinstance(parsed, dict):
        return str(parsed.get("message") or parsed.get("reason") or "")[:300]
    return ""


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "<token>") if token else text


class GpupoolHandler(APIHandler):
    """Lab's own auth (403 without it), no body on any route but PUT /gpupool/preferences,
    errors as `{reason, message}`."""

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.settings[SETTINGS_KEY]
        return gateway

    def refuse_body(self) -> None:
        length = self.request.headers.get("Content-Length", "0")
        if self.request.body or length not in ("", "0"):
            raise tornado.web.HTTPError(400, "These routes take no request body.")

    async def answer(self, call: Any) -> None:
        self.refuse_body()
        try:
            result = await call
        except GatewayUnavailable as error:
            self.set_status(error.status)
            self.finish(json.dumps({"reason": error.reason, "message": error.message}))
            return
        self.finish(json.dumps(result))


class ShapesHandler(GpupoolHandler):
    """GET /gpupool/shapes: the pool's GPU shapes with price, free GPUs and queue length."""

    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(self.shapes())

    async def shapes(self) -> dict[str, Any]:
        specs = await self.gateway.get("/api/kernelspecs")
        local = await self.local_specs()
        shapes = []
        for name, spec in sorted((specs or {}).get("kernelspecs", {}).items()):
            meta = ((spec or {}).get("spec") or {}).get("metadata", {}).get("gpupool")
            if not isinstance(meta, dict) or not meta.get("gpu_type"):
                continue
            gpu_type, count = str(meta["gpu_type"]), int(meta.get("gpu_count", 1))
            shapes.append({
                "name": name,
                "kernel_name": _local_name(local, name, gpu_type, count),
                "display_name": spec["spec"].get("display_name", name),
                "gpu_type": gpu_type, "gpu_count": count,
                "memory_gb": meta.get("memory_gb"), "usd_per_hour": meta.get("usd_per_hour"),
                "free": meta.get("free"), "queue": meta.get("queue"),
            })  # fmt: skip
        shapes.sort(key=lambda s: (s["gpu_type"], s["gpu_count"]))
        offered = {shape["name"] for shape in shapes}
        if _gateway_client(self.serverapp) is None and offered != _installed_pool_specs():
            threading.Thread(target=sync_pool_kernelspecs, args=(self.log,), daemon=True).start()
        return {"shapes": shapes}

    async def local_specs(self) -> dict[str, Any]:
        try:
            specs = await ensure_async(self.kernel_spec_manager.get_all_specs())
        except Exception:
            return {}
        return dict(specs or {})


def _local_name(local: dict[str, Any], name: str, gpu_type: str, count: int) -> str | None:
    """The name this Jupyter server knows the shape by: the gateway's own in gateway mode,
    else an installed kernelspec whose metadata names the same GPU type and count."""
    if name in local:
        return name
    for local_name, spec in local.items():
        meta = ((spec or {}).get("spec") or {}).get("metadata", {}).get("gpupool") or {}
        if (
            str(meta.get("gpu_type", "")).lower() == gpu_type.lower()
            and int(meta.get("gpu_count", 0) or 0) == count
        ):
            return str(local_name)
    return None


class KernelHandler(GpupoolHandler):
    """GET /gpupool/kernels/<id>: a pool kernel's state, GPUs, cost so far, idle deadline."""

    @tornado.web.authenticated
    async def get(self, kernel_id: str) -> None:
        if not KERNEL_ID.fullmatch(kernel_id):
            self.refuse_body()
            raise tornado.web.HTTPError(400, "A kernel id is a lower-case UUID.")
        await self.answer(self.kernel(kernel_id))

    async def kernel(self, kernel_id: str) -> dict[str, Any]:
        remote_id = self.gateway_kernel_id(kernel_id)
        model = await self.gateway.get(f"/api/kernels/{urllib.parse.quote(remote_id)}")
        gpupool = dict(model.get("gpupool") or {})
        deadline = gpupool.get("idle_deadline")
        gpupool["idle_seconds_left"] = (
            max(0.0, round(parse_iso(deadline) - time.time(), 1)) if deadline else None
        )
        return {
            "id": kernel_id,
            "execution_state": model.get("execution_state"),
            "gpupool": gpupool,
            "now": datetime.now(timezone.utc).isoformat(),
        }

    def gateway_kernel_id(self, kernel_id: str) -> str:
        """The gateway's id of this server's kernel (see `pool_kernel_id`); 404 for a kernel
        that runs on this machine."""
        remote = pool_kernel_id(self, kernel_id)
        if remote is None:
            raise tornado.web.HTTPError(404, "This kernel runs on this machine, not in the pool.")
        return remote


def pool_kernel_id(handler: Any, kernel_id: str) -> str | None:
    """The gateway's id of this server's kernel `kernel_id`: the same in gateway mode; a kernel
    started by the pool's provisioner names its own (`gateway_kernel_id`); None for a kernel
    that runs on this machine; 404 for one this server does not have."""
    if _gateway_client(handler.serverapp) is not None:
        return kernel_id
    try:
        kernel = handler.kernel_manager.get_kernel(kernel_id)
    except KeyError:
        raise tornado.web.HTTPError(404, "No such kernel in this Jupyter server.") from None
    remote = getattr(getattr(kernel, "provisioner", None), "gateway_kernel_id", None)
    return remote if isinstance(remote, str) and remote else None


class CompanionHandler(KernelHandler):
    """GET /gpupool/companions/<id>: the `%%gpu` companion of a local kernel, by its gateway id
    (which the cell's footer names). The gateway answers with this server's tenant token, so
    another tenant's kernel is a 404, as one that never existed."""

    def gateway_kernel_id(self, kernel_id: str) -> str:
        return kernel_id


class UsageHandler(GpupoolHandler):
    """GET /gpupool/usage: GPU-hours and cost per day for the last 30 days, the budget, and
    totals per kernel."""

    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(self.usage())

    async def usage(self) -> dict[str, Any]:
        now = datetime.now(timezone.utc)
        first = (now - timedelta(days=USAGE_DAYS - 1)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        since = iso(first.timestamp())
        report = await self.gateway.get("/api/usage?" + urllib.parse.urlencode({"since": since}))
        return summarize(report, first.timestamp(), now.timestamp())


def summarize(report: dict[str, Any], first: float, now: float) -> dict[str, Any]:
    """Per UTC day from `first` to `now`: GPU-hours and cost; per kernel: the same in total."""
    days: list[dict[str, Any]] = [
        {
            "date": datetime.fromtimestamp(first + 86400 * i, timezone.utc).date().isoformat(),
            "gpu_hours": 0.0,
            "cost_usd": 0.0,
        }
        for i in range(USAGE_DAYS)
    ]
    kernels: dict[str, dict[str, Any]] = {}
    for interval in report.get("intervals", []):
        start = max(first, parse_iso(interval["start"]))
        end = min(now, parse_iso(interval["end"]) if interval.get("end") else now)
        count = int(interval.get("gpu_count") or 1)
        rate = float(interval.get("usd_per_gpu_second") or 0.0)
        entry = kernels.setdefault(
            interval["kernel_id"],
            {"kernel_id": interval["kernel_id"], "gpu_type": interval.get("gpu_type"),
             "gpu_count": count, "gpu_hours": 0.0, "cost_usd": 0.0, "open": False},
        )  # fmt: skip
        entry["open"] = entry["open"] or bool(interval.get("open"))
        while start < end:
            index = int((start - first) // 86400)
            if not 0 <= index < USAGE_DAYS:
                break
            piece = min(end, first + 86400 * (index + 1)) - start
            for target in (days[index], entry):
                target["gpu_hours"] += piece * count / 3600
                target["cost_usd"] += piece * count * rate
            start += piece
    for target in (*days, *kernels.values()):
        target["gpu_hours"] = round(target["gpu_hours"], 4)
        target["cost_usd"] = round(target["cost_usd"], 4)
    return {
        "days": days,
        "kernels": sorted(kernels.values(), key=lambda k: -k["cost_usd"]),
        "total_gpu_hours": round(sum(d["gpu_hours"] for d in days), 4),
        "total_cost_usd": round(sum(d["cost_usd"] for d in days), 4),
        "budget": report.get("budget"),
    }


class NoDelayConnection:
    """Mixed in before this server's kernel websocket connection class: TCP_NODELAY on the
    browser's socket before the connection starts relaying kernel messages.

    tornado leaves Nagle's algorithm on for a websocket (it turns it off only to finish an HTTP
    response, the 101 upgrade included, and back on after) and jupyter_server never turns it
    off, so a cell's small reply frames wait for the client's delayed ACK: about 40 ms a `1+1`.
    `KernelWebsocketHandler.open` calls `connect()` right after the upgrade, on every kernel
    websocket whatever the kernel is (a local kernel, a pool kernel through its bridge, or a
    gateway's kernel in gateway mode, where the class is `GatewayWebSocketConnection`)."""

    websocket_handler: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """A pool kernel's websocket skips the ZMQ relay and the bridge: see pool_websocket."""
        target = pool_target(kwargs.get("parent"))
        if target is not None:
            return PoolKernelConnection(target, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def connect(self) -> Any:
        handler = self.websocket_handler
        if getattr(handler, "ws_connection", None) is not None:  # not closed meanwhile
            handler.set_nodelay(True)
        return super().connect()  # type: ignore[misc]


def with_nodelay(connection_class: type) -> type:
    """`connection_class` with `NoDelayConnection` in front of it (itself when it has it)."""
    if issubclass(connection_class, NoDelayConnection):
        return connection_class
    name = f"NoDelay{connection_class.__name__}"
    return type(name, (NoDelayConnection, connection_class), {"__module__": __name__})


def _nodelay_on_kernel_websockets(serverapp: Any) -> None:
    """Whatever kernel websocket connection class this server was configured with (its own
    default, gateway mode's, or a user's `ServerApp.kernel_websocket_connection_class`), served
    with TCP_NODELAY. The handler reads the class from the settings on each connection; the
    server's trait gets the same class, for what reads it there (`close_all` at shutdown)."""
    settings = serverapp.web_app.settings
    wrapped = with_nodelay(settings["kernel_websocket_connection_class"])
    settings["kernel_websocket_connection_class"] = wrapped
    serverapp.kernel_websocket_connection_class = wrapped


class Preferences:
    """Lab's GPU pool settings that this server applies to the kernels it starts."""

    def __init__(self) -> None:
        self.idle_timeout = 0  # seconds; 0: the gateway's default

    def as_json(self) -> dict[str, Any]:
        return {"idleTimeout": self.idle_timeout}

    def kernel_env(self) -> dict[str, str]:
        return {"KERNEL_IDLE_TIMEOUT": str(self.idle_timeout)} if self.idle_timeout else {}


class PreferencesRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def parse_preferences(body: bytes) -> dict[str, Any]:
    """A PUT body: a JSON object with `idleTimeout`, whole seconds from 0 (the gateway's
    default) to 7 days; PreferencesRefused says what is wrong. The tenant's own bounds are the
    gateway's to enforce, when a kernel starts."""
    if len(body) > MAX_PREFERENCES_BYTES:
        raise PreferencesRefused(
            413, f"The preferences body is {len(body)} bytes; at most {MAX_PREFERENCES_BYTES}."
        )
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise PreferencesRefused(400, 'Send a JSON object, e.g. {"idleTimeout": 900}.') from None
    if not isinstance(data, dict):
        raise PreferencesRefused(400, 'Send a JSON object, e.g. {"idleTimeout": 900}.')
    unknown = sorted(str(k)[:40] for k in data if k != "idleTimeout")
    if unknown:
        raise PreferencesRefused(
            400, f"Unknown preference {unknown[0]!r}; this server takes only idleTimeout."
        )
    if "idleTimeout" in data:
        value = data["idleTimeout"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise PreferencesRefused(
                400, f"idleTimeout must be whole seconds, not {json.dumps(value)[:40]}."
            )
        if not 0 <= value <= MAX_IDLE_TIMEOUT:
            raise PreferencesRefused(
                400,
                f"idleTimeout {value} is out of range: 0 (the gateway's default) to "
                f"{MAX_IDLE_TIMEOUT} seconds; the gateway may allow your tenant less.",
            )
    return data


class PreferencesHandler(GpupoolHandler):
    """GET and PUT /gpupool/preferences: `{"idleTimeout": seconds}` for kernels started next."""

    @property
    def preferences(self) -> Preferences:
        preferences: Preferences = self.settings[PREFERENCES_KEY]
        return preferences

    @tornado.web.authenticated
    def get(self) -> None:
        self.refuse_body()
        self.finish(json.dumps(self.preferences.as_json()))

    @tornado.web.authenticated
    def put(self) -> None:
        try:
            data = parse_preferences(self.request.body)
        except PreferencesRefused as error:
            self.set_status(error.status)
            self.finish(json.dumps({"reason": "bad preferences", "message": error.message}))
            return
        if "idleTimeout" in data:
            self.preferences.idle_timeout = int(data["idleTimeout"])
        self.log.info("gpupool: preferences for kernels started from now: %s",
                      self.preferences.as_json())  # fmt: skip
        self.finish(json.dumps(self.preferences.as_json()))


def _apply_to_kernels(serverapp: Any, preferences: Preferences) -> None:
    """Every kernel a session starts (a notebook, a console, a change of kernel) gets the
    preferences in its environment: jupyter_server's SessionManager.get_kernel_env, wrapped on
    this server's instance, so that a custom session manager keeps its own."""
    manager: Any = getattr(serverapp, "session_manager", None)
    original = getattr(manager, "get_kernel_env", None)
    if original is None:
        serverapp.log.warning("gpupool: this session manager has no get_kernel_env; the idle "
                              "timeout setting will not reach kernels")  # fmt: skip
        return

    def get_kernel_env(*args: Any, **kwargs: Any) -> dict[str, str]:
        env = dict(original(*args, **kwargs))
        env.update(preferences.kernel_env())
        return env

    manager.get_kernel_env = get_kernel_env


def _load_jupyter_server_extension(serverapp: Any) -> None:
    web_app = serverapp.web_app
    _nodelay_on_kernel_websockets(serverapp)
    watch_pool_activity(serverapp.kernel_manager)
    web_app.settings[SETTINGS_KEY] = Gateway(GpupoolLab(parent=serverapp), serverapp)
    preferences = web_app.settings[PREFERENCES_KEY] = Preferences()
    _apply_to_kernels(serverapp, preferences)
    base = url_path_join(web_app.settings["base_url"], "gpupool")
    web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "shapes"), ShapesHandler),
            (url_path_join(base, "kernels", r"([^/]+)"), KernelHandler),
            (url_path_join(base, "companions", r"([^/]+)"), CompanionHandler),
            (url_path_join(base, "usage"), UsageHandler),
            (url_path_join(base, "preferences"), PreferencesHandler),
        ],
    )
    serverapp.log.info("gpupool: /gpupool/ routes for the Lab front end are on.")
    if _gateway_client(serverapp) is None:  # beside local kernels: pool kernelspecs of our own
        # A queued pool kernel's start returns at once here, so Lab shows it queued (and can
        # switch a notebook to a shape the notebook's own old kernel holds), unless configured.
        provisioner = serverapp.config.GpupoolProvisioner
        if "wait_for_gpu" not in provisioner:
            provisioner.wait_for_gpu = False
        threading.Thread(target=sync_pool_kernelspecs, args=(serverapp.log,), daemon=True).start()


def sync_pool_kernelspecs(log: Any) -> None:
    """Install a kernelspec per pool shape (started by the gpupool-provisioner) beside the local
    kernels, as `gpupool kernelspec sync` does; at start, and when /gpupool/shapes sees the
    pool's shapes change. Without a gateway configured, nothing (and one line saying so)."""
    from . import credentials
    from .kernelspecs import sync_kernelspecs

    with _SYNCING:
        try:
            url, token = credentials.resolve()
            names = sync_kernelspecs(url, token)
        except credentials.CredentialsError as error:
            log.info("gpupool: no pool kernels in this Jupyter: %s", error)
            return
        except Exception as error:  # a full disk, a folder not ours: local kernels go on
            log.warning("gpupool: pool kernelspecs not synced: %s", error)
            return
        log.info("gpupool: pool kernels %s", ", ".join(names) or "none (the pool offers no GPU)")
