"""The gateway's REST API as `%%gpu` uses it: the Jupyter gateway protocol plus `/api/usage`."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import GatewayError

URL_ENV = "GPUPOOL_URL"
TOKEN_ENV = "GPUPOOL_TOKEN"


# A kept connection that fails this way had been closed by the gateway while idle: the GET is
# sent again on a new one (a GET changes nothing, so sending it twice is safe).
STALE = (http.client.RemoteDisconnected, http.client.CannotSendRequest, ConnectionResetError,
         BrokenPipeError)  # fmt: skip


class GatewayApi:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._kept = threading.local()  # each thread's open connection for GETs

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        if method == "GET" and body is None:
            return self._get(path, timeout)
        return self._urllib(method, path, body, timeout)

    def _urllib(self, method: str, path: str, body: Any, timeout: float) -> Any:
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

    def _get(self, path: str, timeout: float) -> Any:
        """A GET on a connection kept open between calls (one per thread): a `%%gpu` cell asks
        for its bill after each run, and a new connection through urllib cost about 2 ms of
        the cell's time. Straight to the gateway, as the kernel websockets go (no HTTP
        proxy); a redirect is left to urllib, which follows it."""
        parts = urllib.parse.urlsplit(self.url)
        headers = {"Authorization": f"token {self.token}"}
        for attempt in (0, 1):
            conn: http.client.HTTPConnection | None = getattr(self._kept, "conn", None)
            reused = conn is not None
            if conn is None:
                kind = (http.client.HTTPSConnection if parts.scheme == "https"
                        else http.client.HTTPConnection)  # fmt: skip
                conn = kind(parts.netloc, timeout=timeout)
                self._kept.conn = conn
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            conn.timeout = timeout
            try:
                conn.request("GET", parts.path + path, headers=headers)
                response = conn.getresponse()
                text = response.read()
            except STALE as error:
                self._drop(conn)
                if reused and attempt == 0:
                    continue
                raise GatewayError(0, f"cannot reach the gateway at {self.url}: {error}") from None
            except (OSError, http.client.HTTPException) as error:
                self._drop(conn)
                raise GatewayError(0, f"cannot reach the gateway at {self.url}: {error}") from None
            if response.will_close:
                self._drop(conn)
            if 300 <= response.status < 400:
                return self._urllib("GET", path, None, timeout)
            if response.status >= 400:
                raise GatewayError(response.status, _message(text, response.reason))
            return json.loads(text) if text else None
        raise AssertionError("unreachable")

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        self._kept.conn = None

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
