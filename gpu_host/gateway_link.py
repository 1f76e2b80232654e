"""The agent's side of the gateway link: register with the join token, then heartbeat.

Losing the gateway never touches the kernels: the agent keeps serving and retries with backoff."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .auth import HostTokenIdentityProvider
from .status import HostStatus

log = logging.getLogger(__name__)


class GatewayRefused(Exception):
    """The gateway answered but will not take this host (wrong join token, say)."""


class ReportFailed(Exception):
    """This host could not put its own report together: no fault of the gateway's."""


class GatewayLink:
    def __init__(
        self,
        gateway_url: str,
        join_token: str,
        status: HostStatus,
        identity: HostTokenIdentityProvider,
        interval: float,
        max_backoff: float,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.join_token = join_token
        self.status = status
        self.identity = identity
        self.interval = interval
        self.max_backoff = max_backoff
        self.host_id: str | None = None
        self.host_token = ""
        self.http = AsyncHTTPClient()

    async def _post(self, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        request = HTTPRequest(
            f"{self.gateway_url}{path}",
            method="POST",
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
            body=json.dumps(body),
            request_timeout=10,
        )
        response = await self.http.fetch(request)
        reply: dict[str, Any] = json.loads(response.body or b"{}")
        return reply

    def _report(self) -> dict[str, Any]:
        try:
            return self.status.heartbeat()
        except Exception as error:
            raise ReportFailed(f"{type(error).__name__}: {error}") from error

    async def register(self) -> None:
        try:
            reply = await self._post("/api/hosts/register", self.join_token, self._report())
        except HTTPClientError as error:
            if error.code in (400, 401, 403):
                raise GatewayRefused(
                    f"the gateway refused to register this host: {error}"
                ) from None
            raise
        self.host_id = str(reply["host_id"])
        self.host_token = str(reply["host_token"])
        self.identity.accept(self.host_token)
        log.info("registered with gateway %s as host %s", self.gateway_url, self.host_id)

    async def heartbeat(self) -> None:
        try:
            await self._post(
                f"/api/hosts/{self.host_id}/heartbeat", self.host_token, self._report()
            )
        except HTTPClientError as error:
            if error.code in (401, 403, 404):
                log.warning("the gateway no longer knows this host (%s); registering again", error)
                self.host_id = None
                return
            raise

    async def run(self) -> None:
        delay = self.interval
        while True:
            try:
                if self.host_id is None:
                    await self.register()
                await self.heartbeat()
                delay = self.interval
                await asyncio.sleep(self.interval)
            except asyncio.CancelledError:
                raise
            except ReportFailed as error:
                # A bug of ours, not an outage: say so, with its traceback, and try again at
                # the usual pace (the gateway takes a host that stays silent for lost).
                log.error("could not put this host's heartbeat together (%s); retrying in "
                          "%.1f s", error, self.interval, exc_info=error.__cause__)  # fmt: skip
                await asyncio.sleep(self.interval)
            except GatewayRefused as error:
                log.error("%s; check --join-token; retrying in %.1f s", error, self.max_backoff)
                await asyncio.sleep(self.max_backoff)
            except Exception as error:
                log.warning(
                    "gateway %s unreachable (%s); kernels keep running; retrying in %.1f s",
                    self.gateway_url, error, delay,
                )  # fmt: skip
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.max_backoff)
