"""What every gateway handler shares: JSON errors, body limits, and identity from the token."""

from __future__ import annotations

import json
import math
from typing import Any

from tornado import httputil, web

from .errors import ApiError
from .state import GatewayState
from .store import Tenant

MAX_BODY_BYTES = 64 * 1024


def token_of(handler: web.RequestHandler) -> str:
    """The token a request carries, in `Authorization: token T` (or ?token=, for browsers)."""
    header = handler.request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    return handler.get_query_argument("token", "") or ""


def wrong_token(state: GatewayState, address: str, message: str) -> ApiError:
    """The answer to a wrong token: 401, or 429 once `address` sent too many in a minute. A
    right token always works, so a stale script cannot lock out others on its address (all of
    `gpupool up` is 127.0.0.1, and so is everyone behind one proxy)."""
    wait = state.failed_auth.wait_for(address)
    if wait:
        return ApiError(
            429, f"too many requests with a wrong token from {address} (over "
            f"{state.failed_auth.per_minute} a minute); check the token and try again in "
            f"{math.ceil(wait)} s.", retry_after=wait,
        )  # fmt: skip
    state.failed_auth.failed(address)
    return ApiError(401, message)


def tenant_of(state: GatewayState, token: str, address: str) -> Tenant:
    """Identity comes from the token alone. No token is not a guess, so it is not counted."""
    if not token:
        raise ApiError(401, "send your tenant token: 'Authorization: token T'.")
    tenant = state.tenant_for(token)
    if tenant is None:
        raise wrong_token(
            state, address, "this token is unknown or revoked; ask your admin for a new one."
        )
    return tenant


class GatewayHandler(web.RequestHandler):
    in_flight_for: int | None = None  # the tenant this request counts against while answered

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.settings["gpupool"]
        return state

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def given_token(self) -> str:
        return token_of(self)

    def tenant(self) -> Tenant:
        tenant = tenant_of(self.state, self.given_token(), self.request.remote_ip or "")
        if self.in_flight_for is None:  # counted once, until finished (429 past the cap)
            self.state.limits.begin_request(tenant)
            self.in_flight_for = tenant.id
        return tenant

    def on_finish(self) -> None:
        if self.in_flight_for is not None:
            self.state.limits.end_request(self.in_flight_for)
            self.in_flight_for = None

    def require_admin(self) -> None:
        token = self.given_token()
        if not self.state.is_admin(token):
            message = "this needs the gateway's admin token."
            if not token:
                raise ApiError(401, message)
            raise wrong_token(self.state, self.request.remote_ip or "", message)

    def body(self) -> dict[str, Any]:
        raw = self.request.body or b"{}"
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes.")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object.")
        return data

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, ApiError):
            self.set_status(error.status)
            status_code, message = error.status, error.message
            if error.retry_after is not None:
                self.set_header("Retry-After", str(max(1, round(error.retry_after))))
        elif isinstance(error, web.HTTPError) and status_code == 405:
            message = (
                f"{self.request.method} is not allowed on {self.request.path[:200]}; "
                "see /api/openapi.json."
            )
        elif isinstance(error, web.HTTPError):
            message = error.log_message or ""
            if message and error.args:
                message = message % error.args
            message = message or error.reason or httputil.responses.get(status_code, "")
            message = message or "the request failed"
        else:
            message = "the gateway hit an unexpected error; it is logged. Try again."
        reason = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                  409: "Conflict", 413: "Payload Too Large",
                  429: "Too Many Requests"}.get(status_code)  # fmt: skip
        reason = reason or httputil.responses.get(status_code, "Error")
        self.set_status(status_code, reason)
        self.finish(json.dumps({"reason": reason, "message": message}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError):
            return  # an answer, not a failure
        super().log_exception(typ, value, tb)
