"""The gateway's calls to its hosts' REST API, with the host's own token.

`GatewayKernels` takes any `HostApi` (tests pass a stand-in that answers as a host would)."""

from __future__ import annotations

import json
from typing import Any, Protocol

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .pool import HostView

CONNECT_SECONDS = 10.0
REQUEST_SECONDS = 120.0  # a checkpoint of a large namespace takes a while


class HostApi(Protocol):
    async def __call__(
        self, host: HostView, method: str, path: str, body: Any = None
    ) -> dict[str, Any]: ...


class HostClient:
    """One JSON request to a host; an HTTP error is tornado's `HTTPClientError` (599 when the
    host could not be reached in time), any other failure its `OSError`."""

    def __init__(self) -> None:
        # Its own client: tornado's shared one runs 10 requests at a time, so a burst of starts
        # would queue (and time out) behind each other, and deletes behind them.
        self.http = AsyncHTTPClient(force_instance=True, max_clients=512)

    async def __call__(
        self, host: HostView, method: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        request = HTTPRequest(
            host.url + path,
            method=method,
            headers={"Authorization": f"token {host.token}", "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else (b"{}" if method == "POST" else None),
            connect_timeout=CONNECT_SECONDS,
            request_timeout=REQUEST_SECONDS,
        )
        response = await self.http.fetch(request)
        return dict(json.loads(response.body)) if response.body else {}


def error_message(error: HTTPClientError) -> str:
    """The host's own sentence for an HTTP error it answered, else tornado's."""
    try:
        return str(json.loads(error.response.body)["message"]) if error.response else str(error)
    except (ValueError, KeyError, TypeError):
        return str(error)
