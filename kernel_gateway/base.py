"""What every gateway handler shares: who may call it, checked before any of the body is read;
the body bounded in size and JSON depth before it is parsed; and JSON errors."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from tornado import httputil, web
from tornado.http1connection import HTTP1Connection

from .errors import ApiError
from .log_redaction import request_summary
from .state import GatewayState
from .store import DB_RETRY_SECONDS, Tenant, unavailable
from .tokens import same

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024
MAX_HOST_REPORT_BYTES = 1 << 20  # a busy host's heartbeat lists every kernel it runs
MAX_JSON_DEPTH = 32  # deeper nesting than any request of ours, far from Python's recursion limit
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """How deeply `raw`'s arrays and objects nest, counted without parsing it."""
    depth = most = 0
    for c in JSON_STRING.sub(b"", raw).translate(None, NOT_BRACKETS):
        depth += 1 if c in b"[{" else -1
        most = max(most, depth)
    return most


def read_json_object(raw: bytes, limit: int) -> dict[str, Any]:
    """A request body as a JSON object, refused (413, 400) before parsing when too big or deep."""
    if len(raw) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes; send less.")
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ApiError(
            400, f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep; "
            "no request of this API needs that.",
        )  # fmt: skip
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    return data


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


def allowed_methods(handler: type[web.RequestHandler]) -> list[str]:
    """The methods a handler class answers, as a 405's Allow header lists them."""
    return [
        m for m in handler.SUPPORTED_METHODS
        if getattr(handler, m.lower(), None) is not web.RequestHandler._unimplemented_method
    ]  # fmt: skip


@web.stream_request_body  # so that prepare() runs before any of the body is read
class GatewayHandler(web.RequestHandler):
    # Who may call the route: tenant, admin, metrics (the scrape token or admin), join (a host
    # registering), host (its own heartbeat) or anyone. Checked in prepare(), before the body.
    who = "tenant"
    max_body = MAX_BODY_BYTES
    caller: Tenant | None = None
    in_flight_for: int | None = None  # the tenant this request counts against while answered

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.settings["gpupool"]
        return state

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        self.authenticate()
        self._chunks: list[bytes] = []
        self._received = 0
        length = self.request.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            raise self.too_big(int(length) if length.isdigit() else None)
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            connection.set_max_body_size(self.max_body)  # chunked bodies too

    def too_big(self, size: int | None) -> ApiError:
        """The 413 for a body over max_body (`size`: its length, when it said one)."""
        return ApiError(413, f"the request body is over {self.max_body} bytes; send less.")

    def data_received(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received <= self.max_body:
            self._chunks.append(chunk)

    def authenticate(self) -> None:
        if self.who == "tenant":
            self.caller = self.tenant()
        elif self.who == "admin":
            self.require_admin()
        elif self.who == "metrics":
            token = self.given_token()
            metrics_token = self.settings.get("metrics_token") or ""
            if not (metrics_token and token and same(token, metrics_token)):
                self.require_admin("this needs the gateway's metrics (scrape) or admin token.")
        elif self.who == "join":
            if not self.state.is_join(self.given_token()):
                raise ApiError(401, "registering a host needs the cluster join token.")
        elif self.who == "host":
            self.state.known_host(self.path_kwargs.get("host_id", ""), self.given_token())
        else:
            assert self.who == "anyone", self.who

    def given_token(self) -> str:
        return token_of(self)

    def tenant(self) -> Tenant:
        if self.caller is not None:
            return self.caller
        tenant = tenant_of(self.state, self.given_token(), self.request.remote_ip or "")
        if self.in_flight_for is None:  # counted once, until finished (429 past the cap)
            self.state.limits.begin_request(tenant)
            self.in_flight_for = tenant.id
        return tenant

    def on_finish(self) -> None:
        if self.in_flight_for is not None:
            self.state.limits.end_request(self.in_flight_for)
            self.in_flight_for = None

    def require_admin(self, message: str = "this needs the gateway's admin token.") -> None:
        token = self.given_token()
        if not self.state.is_admin(token):
            if not token:
                raise ApiError(401, message)
            raise wrong_token(self.state, self.request.remote_ip or "", message)

    def body(self) -> dict[str, Any]:
        if self._received > self.max_body:
            raise self.too_big(self._received)
        return read_json_object(b"".join(self._chunks), self.max_body)

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if error is not None and unavailable(error):  # rolled back: nothing half-written
            error = ApiError(
                503, "the gateway's database is not answering; nothing was changed. Try again "
                f"in {DB_RETRY_SECONDS} s.", retry_after=DB_RETRY_SECONDS,
            )  # fmt: skip
        if isinstance(error, ApiError):
            self.set_status(error.status)
            status_code, message = error.status, error.message
            if error.retry_after is not None:
                self.set_header("Retry-After", str(max(1, round(error.retry_after))))
        elif isinstance(error, web.HTTPError) and status_code == 405:
            self.set_header("Allow", ", ".join(allowed_methods(type(self))))
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

    def _request_summary(self) -> str:  # what tornado's own log lines show of the request
        return request_summary(self)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError):
            return  # an answer, not a failure
        if unavailable(value):  # one line, not a traceback per request while it is down
            log.warning("%s: the database is not answering: %s", self._request_summary(),
                        str(getattr(value, "orig", None) or value).strip()[:300])  # fmt: skip
            return
        super().log_exception(typ, value, tb)
