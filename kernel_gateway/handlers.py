"""The gateway's REST API: the Jupyter gateway protocol, the pool, hosts and administration."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from gpupool.wire import CPU, Shape, shape_of_kernel_name

from .base import MAX_BODY_BYTES, MAX_HOST_REPORT_BYTES, GatewayHandler, tenant_of
from .errors import ApiError
from .host_report import read_heartbeat, read_registration
from .ledger import read_time, to_csv
from .metrics import render_metrics
from .openapi import OPENAPI
from .shapes import display_name, usd_per_gpu_hour, usd_per_hour
from .share_page import NOT_FOUND_PAGE, PAGE_HEADERS, page
from .shares import Shares, not_found
from .store import DB_RETRY_SECONDS, Tenant, ping

KERNEL_ID = r"(?P<kernel_id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
MAX_ENV_KEYS = 256
MAX_ENV_VALUE = 4096
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
SPEC_COUNTS = (1, 2, 4, 8)


def read_env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "env must be a JSON object of string keys and string values.")
    if len(value) > MAX_ENV_KEYS:
        raise ApiError(400, f"env has {len(value)} keys; at most {MAX_ENV_KEYS} are allowed.")
    for key, text in value.items():
        if not ENV_KEY.match(key):
            raise ApiError(400, f"env key {key[:40]!r} is not a valid variable name.")
        if not isinstance(text, str) or len(text) > MAX_ENV_VALUE or "\0" in text or "\n" in text:
            raise ApiError(
                400, f"env value of {key} must be a string of at most {MAX_ENV_VALUE} characters "
                "with no NUL or newline.",
            )  # fmt: skip
    return dict(value)


def offered_shapes(types: dict[str, dict[str, int]]) -> list[Shape]:
    """CPU, then each GPU type at every spec count that one host can give."""
    return [CPU] + [
        Shape(t, n) for t, v in sorted(types.items()) for n in SPEC_COUNTS if n <= v["most"]
    ]


class KernelspecsHandler(GatewayHandler):
    def specs(self) -> dict[str, Any]:
        pool = self.state.pool
        types = pool.types()
        shapes = offered_shapes(types)
        specs = {}
        cpu_hosts = len(pool.placeable())
        for shape in shapes:
            entry = types.get(shape.gpu_type or "", {})
            per_gpu = round(entry.get("memory", 0) / 1024**3)
            waiting = len(self.state.kernels.queued(shape.gpu_type)) if shape.gpu_count else 0
            specs[shape.kernel_name] = {
                "name": shape.kernel_name,
                "spec": {
                    "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": display_name(shape),
                    "language": "python",
                    "interrupt_mode": "signal",
                    "env": {},
                    "metadata": {
                        "gpupool": {
                            "gpu_type": shape.gpu_type,
                            "gpu_count": shape.gpu_count,
                            # GPU memory the kernel gets: all of its GPUs together.
                            "memory_gb": per_gpu * shape.gpu_count,
                            "memory_gb_per_gpu": per_gpu,
                            "usd_per_hour": usd_per_hour(shape),
                            # GPUs of that type free now; for CPU, hosts that can start one now.
                            "free": entry.get("free", 0) if shape.gpu_count else cpu_hosts,
                            "queue": waiting,
                        }
                    },
                },
                "resources": {},
            }
        return specs

    def get(self, name: str | None = None) -> None:
        self.tenant()
        specs = self.specs()
        # jupyter_server's gateway client asks for one spec as ?user=NAME/specname.
        user = self.get_query_argument("user", "")
        if name is None and "/" in user:
            name = user.split("/", 1)[1]
        if name is None:
            self.reply({"default": "python3", "kernelspecs": specs})
        elif name in specs:
            self.reply(specs[name])
        else:
            raise ApiError(
                404, f"no kernelspec named {name[:80]!r}; the pool offers: {', '.join(specs)}."
            )


class KernelspecResourceHandler(GatewayHandler):
    def get(self, name: str, path: str) -> None:
        self.tenant()
        raise ApiError(404, f"kernelspec {name[:80]} has no resource {path[:80]!r}.")


class KernelsHandler(GatewayHandler):
    def get(self) -> None:
        self.reply(self.state.kernels.list_for(self.tenant()))

    async def post(self) -> None:
        tenant = self.tenant()
        body = self.body()
        name = body.get("name") or "python3"
        if not isinstance(name, str):
            raise ApiError(400, "name must be a kernelspec name such as python3-gpu-h100-x1.")
        if shape_of_kernel_name(name) is None:
            offered = ", ".join(s.kernel_name for s in offered_shapes(self.state.pool.types()))
            raise ApiError(404, f"no kernelspec named {name[:80]!r}; the pool offers: {offered}.")
        model = await self.state.kernels.create(tenant, name, read_env(body.get("env")))
        self.set_header("Location", f"/api/kernels/{model['id']}")
        self.reply(model, 201)


class KernelHandler(GatewayHandler):
    def get(self, kernel_id: str) -> None:
        kernels = self.state.kernels
        self.reply(kernels.model(kernels.get(self.tenant(), kernel_id)))

    async def delete(self, kernel_id: str) -> None:
        await self.state.kernels.delete(self.tenant(), kernel_id)
        self.set_status(204)
        self.finish()


class KernelActionHandler(GatewayHandler):
    async def post(self, kernel_id: str, action: str) -> None:
        model = await self.state.kernels.action(self.tenant(), kernel_id, action)
        if action == "interrupt":
            self.set_status(204)
            self.finish()
        else:
            self.reply(model)


class GpusHandler(GatewayHandler):
    def get(self) -> None:
        self.tenant()
        self.reply([
            {"gpu_type": t, "memory_gb": round(v["memory"] / 1024**3), "total": v["total"],
             "free": v["free"], "usd_per_hour": usd_per_gpu_hour(t),
             "queue": len(self.state.kernels.queued(t))}
            for t, v in sorted(self.state.pool.types().items())
        ])  # fmt: skip


class RegisterHostHandler(GatewayHandler):
    who = "join"
    max_body = MAX_HOST_REPORT_BYTES

    def post(self) -> None:
        self.reply(self.state.register_host(read_registration(self.body())))


class HeartbeatHandler(GatewayHandler):
    who = "host"
    max_body = MAX_HOST_REPORT_BYTES

    def post(self, host_id: str) -> None:
        self.state.heartbeat(host_id, self.given_token(), read_heartbeat(self.body()))
        self.reply({})


class HostsHandler(GatewayHandler):
    who = "admin"

    def get(self) -> None:
        self.reply(self.state.hosts())


class TenantsHandler(GatewayHandler):
    who = "admin"

    def get(self) -> None:
        self.reply(self.state.tenants())

    def post(self) -> None:
        body = self.body()
        name = body.get("name")
        if not isinstance(name, str):
            raise ApiError(400, 'send {"name": NAME} to create a tenant.')
        shared_ok = body.get("allow_shared_host", False)
        if not isinstance(shared_ok, bool):
            raise ApiError(
                400, "allow_shared_host must be true or false: true accepts a further tenant on "
                "a host that runs every tenant's kernels as one Unix user.",
            )  # fmt: skip
        # As `gpupool tenant create`: a second tenant on a host that cannot isolate is refused
        # (409) unless the admin accepts it explicitly.
        tenant, token = self.state.create_tenant(
            name, body.get("max_gpus"), body.get("max_kernels"),
            body.get("idle_min"), body.get("idle_max"), body.get("budget_usd"),
            allow_shared_host=shared_ok,
        )  # fmt: skip
        self.reply({"name": tenant.name, "token": token}, 201)


class TenantHandler(GatewayHandler):
    who = "admin"

    def patch(self, name: str) -> None:
        self.reply(self.state.update_tenant(name, self.body()))

    async def delete(self, name: str) -> None:
        """Revoke: tokens, open websockets, kernels and their billing all end (state.py)."""
        await self.state.end_tenant(name)
        self.set_status(204)
        self.finish()


class TokensHandler(GatewayHandler):
    who = "admin"

    def post(self) -> None:
        tenant = self.body().get("tenant")
        if not isinstance(tenant, str):
            raise ApiError(400, 'send {"tenant": NAME} to make a new token for that tenant.')
        self.reply({"tenant": tenant, "token": self.state.new_token_for(tenant)}, 201)


class UsageHandler(GatewayHandler):
    """The calling tenant's ledger: intervals overlapping [since, until], each counted within
    it, totals per GPU type, and the month's budget; JSON, or CSV with `?format=csv`."""

    PARAMS = ("since", "until", "kernel", "format", "token")

    def get(self) -> None:
        tenant = self.tenant()
        unknown = sorted(set(self.request.query_arguments) - set(self.PARAMS))
        if unknown:
            raise ApiError(
                400, f"unknown parameter {unknown[0][:40]!r}; /api/usage takes since, until "
                "(ISO 8601 times), kernel (an id) and format (json or csv).",
            )  # fmt: skip
        since = read_time("since", self.get_query_argument("since", None))
        until = read_time("until", self.get_query_argument("until", None))
        if since is not None and until is not None and since > until:
            raise ApiError(400, "since is after until; swap them.")
        kernel_id = self.get_query_argument("kernel", None)
        if kernel_id is not None:
            # Another tenant's kernel answers exactly as one that never existed.
            if not re.fullmatch(KERNEL_ID, kernel_id) or not self.state.kernels.ever_owned(
                tenant, kernel_id
            ):
                raise ApiError(404, f"Kernel does not exist: {kernel_id[:40]}")
        form = self.get_query_argument("format", "json")
        if form not in ("json", "csv"):
            raise ApiError(400, f"format={form[:20]!r}: use json (the default) or csv.")
        ledger = self.state.kernels.ledger
        report = ledger.report(tenant.id, since, until, kernel_id)
        if form == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", 'attachment; filename="gpupool-usage.csv"')
            self.finish(to_csv(report))
            return
        report["tenant"] = tenant.name
        report["budget"] = self.state.kernels.budgets.summary(tenant)
        self.reply(report)


class MetricsHandler(GatewayHandler):
    who = "metrics"

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(render_metrics(self.settings["metrics"]))


class HealthHandler(GatewayHandler):
    """For load balancers and Kubernetes probes: 200 while this replica can reach the database,
    else 503 with Retry-After (a replica that cannot is taken out of rotation, not restarted in
    a loop: the database, not the replica, is what is down)."""

    who = "anyone"

    def get(self) -> None:
        problem = ping(self.state.db)
        if problem:
            raise ApiError(
                503, f"this gateway cannot reach its database ({problem[:200]}); try again "
                "shortly.", retry_after=DB_RETRY_SECONDS,
            )  # fmt: skip
        self.reply({"status": "ok", "database": "ok"})


class OpenApiHandler(GatewayHandler):
    who = "anyone"

    def get(self) -> None:
        self.reply(OPENAPI)


class ShareBase(GatewayHandler):
    @property
    def shares(self) -> Shares:
        shares = self.state.shares
        assert shares is not None, "GatewayApp.make_state sets it"
        return shares


class SharesHandler(ShareBase):
    """The caller's shared notebook links: list them, or share a notebook."""

    @property
    def max_body(self) -> int:  # type: ignore[override]
        # The notebook, with room for the options and the package list around it.
        return self.shares.max_bytes + MAX_BODY_BYTES * 16

    def too_big(self, size: int | None) -> ApiError:
        if size is None:
            return super().too_big(size)
        return self.shares.too_big(size)

    def get(self) -> None:
        self.reply(self.shares.list_for(self.tenant()))

    def post(self) -> None:
        model = self.shares.create(self.tenant(), self.body())
        self.set_header("Location", f"/api/shares/{model['id']}")
        self.reply(model, 201)


class ShareHandler(ShareBase):
    def delete(self, share_id: str) -> None:
        """Revoke at once: the page and copies answer 404 from now on."""
        self.shares.revoke(self.tenant(), share_id)
        self.set_status(204)
        self.finish()


class ShareCopiesHandler(ShareBase):
    def post(self, share_id: str) -> None:
        """The viewer's own copy of a `run` link, to open on their own kernel (billed to them
        when they start it, with their own token). A link the caller may not open is 404, as
        one that never existed; a view-only link they may see is 403, which tells them nothing
        they could not read on its page."""
        opened = self.shares.open(share_id, self.tenant())
        if opened is None:
            raise not_found()
        share, shared_by = opened
        if share.mode != "run":
            raise ApiError(
                403, "this link is view-only: it shows the notebook but gives no copy to run. "
                "Ask its sharer for a run link.",
            )  # fmt: skip
        copy = self.shares.copy(share, shared_by)
        self.shares.count(share, "runs")
        self.reply(copy, 201)


class SharePageHandler(ShareBase):
    """GET /s/{id}: the read-only page. Links for tenants only need the viewer's token in the
    Authorization header (never in the URL); a wrong or missing one is the same 404."""

    who = "anyone"

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        for name, value in PAGE_HEADERS.items():
            self.set_header(name, value)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json")  # errors other than 404 are JSON
        super().write_error(status_code, **kwargs)

    def viewer(self) -> Tenant | None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in ("token", "bearer") or not token.strip():
            return None
        try:
            return tenant_of(self.state, token.strip(), self.request.remote_ip or "")
        except ApiError as error:
            if error.status == 429:
                raise
            return None

    async def get(self, share_id: str) -> None:
        opened = self.shares.open(share_id, self.viewer())
        if opened is None:
            self.set_status(404)
            self.finish(NOT_FOUND_PAGE)
            return
        share, shared_by = opened
        rendered = await self.shares.rendered(share)
        self.shares.count(share, "views")
        link = f"{self.state.kernels.public_url}/s/{share.id}"
        self.finish(page(rendered, share, shared_by, link))


class NotFoundHandler(GatewayHandler):
    def prepare(self) -> None:
        raise ApiError(404, f"no such endpoint: {self.request.path[:200]}; see /api/openapi.json.")


def routes() -> list[tuple[str, Any]]:
    from .proxy import ChannelsHandler

    return [
        (r"/api/kernelspecs/?", KernelspecsHandler),
        (r"/api/kernelspecs/(?P<name>[^/]+)/?", KernelspecsHandler),
        (r"/kernelspecs/(?P<name>[^/]+)/(?P<path>.+)", KernelspecResourceHandler),
        (r"/api/kernels/?", KernelsHandler),
        (rf"/api/kernels/{KERNEL_ID}/?", KernelHandler),
        (rf"/api/kernels/{KERNEL_ID}/(?P<action>interrupt|restart)/?", KernelActionHandler),
        (rf"/api/kernels/{KERNEL_ID}/channels", ChannelsHandler),
        (r"/api/gpus/?", GpusHandler),
        (r"/api/usage/?", UsageHandler),
        (r"/api/hosts/register", RegisterHostHandler),
        (r"/api/hosts/(?P<host_id>[0-9a-f-]{36})/heartbeat", HeartbeatHandler),
        (r"/api/hosts/?", HostsHandler),
        (r"/api/admin/tenants/?", TenantsHandler),
        (r"/api/admin/tenants/(?P<name>[^/]+)", TenantHandler),
        (r"/api/admin/tokens/?", TokensHandler),
        (r"/api/shares/?", SharesHandler),
        (r"/api/shares/(?P<share_id>[^/]+)/copies/?", ShareCopiesHandler),
        (r"/api/shares/(?P<share_id>[^/]+)/?", ShareHandler),
        (r"/s/(?P<share_id>[^/]+)", SharePageHandler),
        (r"/metrics", MetricsHandler),
        (r"/api/openapi.json", OpenApiHandler),
        (r"/api/health", HealthHandler),
        (r".*", NotFoundHandler),
    ]
