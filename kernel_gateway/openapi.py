"""The OpenAPI 3 description of the gateway, served at /api/openapi.json."""

from __future__ import annotations

from typing import Any

from . import __version__


def _op(summary: str, who: str, status: str = "200", body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [] if who == "anyone" else [{who: []}],
        "responses": {status: {"description": "success"},
                      "4XX": {"description": "JSON {reason, message}"}},
    }  # fmt: skip
    if body:
        op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
    return op


KID = "/api/kernels/{kernel_id}"
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
            for name in ("tenant_token", "admin_token", "join_token", "host_token")
        }
    },
    "paths": {
        "/api/kernelspecs": {
            "get": _op("Kernelspecs: one per GPU shape, plus CPU", "tenant_token")
        },
        "/api/kernelspecs/{name}": {"get": _op("One kernelspec", "tenant_token")},
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
            "get": _op("A kernel's model", "tenant_token"),
            "delete": _op("Shut a kernel down", "tenant_token", "204"),
        },
        KID + "/interrupt": {"post": _op("Interrupt", "tenant_token", "204")},
        KID + "/restart": {"post": _op("Restart", "tenant_token")},
        KID + "/channels": {
            "get": _op("Kernel websocket (legacy JSON or v1)", "tenant_token", "101")
        },
        "/api/gpus": {"get": _op("The pool per GPU type", "tenant_token")},
        "/api/usage": {
            "get": _op(
                "The caller's ledger: intervals, totals per GPU type, the month's budget; "
                "?since=&until= (ISO 8601), ?kernel=ID, ?format=csv",
                "tenant_token",
            )
        },
        "/api/hosts": {"get": _op("GPU hosts", "admin_token")},
        "/api/hosts/register": {"post": _op("A host joins", "join_token", body=True)},
        "/api/hosts/{host_id}/heartbeat": {"post": _op("Host heartbeat", "host_token", body=True)},
        "/api/admin/tenants": {
            "get": _op("Tenants", "admin_token"),
            "post": _op("Create a tenant; its token is shown once", "admin_token", "201", True),
        },
        "/api/admin/tenants/{name}": {
            "patch": _op(
                "Change a tenant's budget_usd, max_gpus or max_kernels (null removes it)",
                "admin_token",
                body=True,
            ),
            "delete": _op("Revoke a tenant", "admin_token", "204"),
        },
        "/api/admin/tokens": {"post": _op("A new token for a tenant", "admin_token", "201", True)},
        "/metrics": {"get": _op("Prometheus metrics", "anyone")},
        "/api/openapi.json": {"get": _op("This description", "anyone")},
    },
}
