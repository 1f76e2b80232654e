"""The OpenAPI 3 description of the gateway, served at /api/openapi.json."""

from __future__ import annotations

from typing import Any

from . import __version__


def _op(summary: str, who: str, status: str = "200", body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [] if who == "anyone" else [{w: []} for w in who.split("|")],
        "responses": {status: {"description": "success"},
                      "4XX": {"description": "JSON {reason, message}"}},
    }  # fmt: skip
    if body:
        op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
    return op


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", **schema}}


def _query(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string", **schema}}  # fmt: skip


UUID = {"pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"}
KERNEL_ID = [_path("kernel_id", UUID)]
NAME = [_path("name", {"pattern": "^[^/]+$", "minLength": 1})]
KID = "/api/kernels/{kernel_id}"
SHARE_ID = [_path("share_id", {"pattern": "^[^/]+$", "minLength": 1})]
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "gpupool gateway", "version": __version__},
    "components": {
        "securitySchemes": {
            name: {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": f"'token T' with the {name.replace('_', ' ')}",
            }
            for name in (
                "tenant_token",
                "admin_token",
                "join_token",
                "host_token",
                "metrics_token",
            )
        }
    },
    "paths": {
        "/api/kernelspecs": {
            "get": _op("Kernelspecs: one per GPU shape, plus CPU", "tenant_token")
        },
        "/api/kernelspecs/{name}": {
            "parameters": NAME,
            "get": _op("One kernelspec", "tenant_token"),
        },
        "/kernelspecs/{name}/{path}": {
            "parameters": [*NAME, _path("path", {"minLength": 1})],
            "get": _op("A kernelspec's resource (logos): none here, always 404", "tenant_token"),
        },
        "/api/kernels": {
            "get": _op("The caller's kernels", "tenant_token"),
            "post": _op(
                "Start a kernel ({name, env}); queued when no GPU is free",
                "tenant_token",
                "201",
                body=True,
            ),
        },
        KID: {
            "parameters": KERNEL_ID,
            "get": _op("A kernel's model", "tenant_token"),
            "delete": _op("Shut a kernel down", "tenant_token", "204"),
        },
        KID + "/interrupt": {
            "parameters": KERNEL_ID,
            "post": _op("Interrupt", "tenant_token", "204"),
        },
        KID + "/restart": {"parameters": KERNEL_ID, "post": _op("Restart", "tenant_token")},
        KID + "/channels": {
            "parameters": KERNEL_ID,
            "get": _op("Kernel websocket (legacy JSON or v1)", "tenant_token", "101"),
        },
        "/api/gpus": {"get": _op("The pool per GPU type", "tenant_token")},
        "/api/usage": {
            "parameters": [
                _query("since", "ISO 8601 time"),
                _query("until", "ISO 8601 time"),
                _query("kernel", "a kernel id"),
                _query("format", "json (the default) or csv", enum=["json", "csv"]),
            ],
            "get": _op(
                "The caller's ledger: intervals, totals per GPU type, the month's budget; "
                "?since=&until= (ISO 8601), ?kernel=ID, ?format=csv",
                "tenant_token",
            ),
        },
        "/api/hosts": {"get": _op("GPU hosts", "admin_token")},
        "/api/hosts/register": {"post": _op("A host joins", "join_token", body=True)},
        "/api/hosts/{host_id}/heartbeat": {
            "parameters": [_path("host_id", {"pattern": "^[0-9a-f-]{36}$"})],
            "post": _op("Host heartbeat", "host_token", body=True),
        },
        "/api/admin/tenants": {
            "get": _op("Tenants", "admin_token"),
            "post": _op(
                "Create a tenant; its token is shown once. {name, max_gpus, max_kernels, "
                "idle_min, idle_max, budget_usd, allow_shared_host}; 409 for a further tenant "
                "while a host cannot isolate tenants, unless allow_shared_host is true",
                "admin_token",
                "201",
                True,
            ),
        },
        "/api/admin/tenants/{name}": {
            "parameters": NAME,
            "patch": _op(
                "Change a tenant's budget_usd, max_gpus or max_kernels (null removes it)",
                "admin_token",
                body=True,
            ),
            "delete": _op("Revoke a tenant", "admin_token", "204"),
        },
        "/api/admin/tokens": {"post": _op("A new token for a tenant", "admin_token", "201", True)},
        "/api/shares": {
            "get": _op(
                "The caller's shared notebook links, with view and run counts", "tenant_token"
            ),
            "post": _op(
                "Share a notebook: {notebook, name, mode: view|run, access: anyone|gateway|"
                "tenants, tenants, expires_in (s), outputs: keep|strip, kernel_name, "
                "environment: {python, packages}}; 413 over the size limit",
                "tenant_token",
                "201",
                body=True,
            ),
        },
        "/api/shares/{share_id}": {
            "parameters": SHARE_ID,
            "delete": _op("Revoke a shared link at once", "tenant_token", "204"),
        },
        "/api/shares/{share_id}/copies": {
            "parameters": SHARE_ID,
            "post": _op(
                "A run link's notebook copy, kernel shape and packages, for the caller's own "
                "kernel (403 for a view-only link)",
                "tenant_token",
                "201",
            ),
        },
        "/s/{share_id}": {
            "parameters": SHARE_ID,
            "get": _op(
                "Read-only HTML page of a shared notebook (links for tenants only need the "
                "Authorization header); 404 for revoked, expired, not allowed or unknown",
                "anyone",
            ),
        },
        "/metrics": {"get": _op("Prometheus metrics", "metrics_token|admin_token")},
        "/api/openapi.json": {"get": _op("This description", "anyone")},
        "/api/health": {
            "get": _op(
                "200 while this gateway reaches its database, else 503 with Retry-After (for "
                "load balancers and readiness probes)",
                "anyone",
            )
        },
    },
}
