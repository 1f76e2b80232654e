"""Tokens kept out of the gateway's log: a URI's `?token=` (browsers and websockets send one)
shows its first 4 characters at most, in the access log and in every other log line."""

from __future__ import annotations

import logging
import re

from tornado import web
from tornado.log import access_log

SHOWN = 4
# token=VALUE in a query string, raw or once percent-encoded ("token%3D" in a logged URL).
TOKEN_IN_URI = re.compile(r"((?:^|[?&;\s]|%26)(?:token|access_token)(?:=|%3D))([^&;#\s'\"]*)", re.I)
TOKEN_IN_HEADER = re.compile(
    r"(authorization['\"]?\s*[:=]\s*['\"]?(?:token|bearer)\s+)([^\s'\"]+)", re.I
)


def _shorten(match: re.Match[str]) -> str:
    value = match[2]
    return match[1] + (value[:SHOWN] + "…" if len(value) > SHOWN else value)


def redact(text: str) -> str:
    return TOKEN_IN_HEADER.sub(_shorten, TOKEN_IN_URI.sub(_shorten, text))


def request_summary(handler: web.RequestHandler) -> str:
    request = handler.request
    return f"{request.method} {redact(request.uri or '')} ({request.remote_ip})"


def log_request(handler: web.RequestHandler) -> None:
    """Tornado's access log line (the app's `log_function`), with the token redacted."""
    status = handler.get_status()
    log = access_log.info if status < 400 else access_log.warning if status < 500 else (
        access_log.error
    )  # fmt: skip
    log("%d %s %.2fms", status, request_summary(handler), 1000.0 * handler.request.request_time())


class RedactTokens(logging.Filter):
    """On a log handler: every record it writes (tornado's 'Uncaught exception GET /…?token=',
    a 4xx's warning, our own lines) passes through `redact` first."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_all_logs() -> None:
    """Put `RedactTokens` on each of the root logger's handlers (where every logger writes)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactTokens) for f in handler.filters):
            handler.addFilter(RedactTokens())
