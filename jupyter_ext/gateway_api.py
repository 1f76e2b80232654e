"""The gateway's REST API as `%%gpu` uses it: the Jupyter gateway protocol plus `/api/usage`."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import GatewayError

URL_ENV = "GPUPOOL_URL"
TOKEN_ENV = "GPUPOOL_TOKEN"


class GatewayApi:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise GatewayError(error.code, _message(error.read(), error.reason)) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise GatewayError(0, f"cannot reach the gateway at {self.url}: {reason}") from None
        return json.loads(text) if text else None

    def start_kernel(self, name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        return dict(self.call("POST", "/api/kernels", {"name": name, "env": env or {}}))

    def kernelspec(self, name: str) -> dict[str, Any]:
        """The pool's kernelspec `name`; GatewayError 404, naming those offered, if none."""
        return dict(self.call("GET", f"/api/kernelspecs/{urllib.parse.quote(name, safe='')}"))

    def kernel(self, kernel_id: str) -> dict[str, Any] | None:
        """The kernel's model, or None once it is gone."""
        try:
            return dict(self.call("GET", f"/api/kernels/{kernel_id}"))
        except GatewayError as error:
            if error.status == 404:
                return None
            raise

    def shutdown(self, kernel_id: str, timeout: float = 30) -> None:
        try:
            self.call("DELETE", f"/api/kernels/{kernel_id}", timeout=timeout)
        except GatewayError as error:
            if error.status != 404:
                raise

    def interrupt(self, kernel_id: str) -> None:
        self.call("POST", f"/api/kernels/{kernel_id}/interrupt")

    def usage(
        self, kernel_id: str | None = None, since: str | None = None, until: str | None = None
    ) -> dict[str, Any]:
        """The tenant's ledger (one kernel's), counted within [since, until] (ISO times)."""
        params = {"kernel": kernel_id, "since": since, "until": until}
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v})
        return dict(self.call("GET", "/api/usage" + ("?" + query if query else "")))


def _message(body: bytes, fallback: str) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:300] or fallback
    if isinstance(parsed, dict):
        return str(parsed.get("message") or parsed.get("reason") or fallback)
    return fallback
