"""The one error the gateway answers with: an HTTP status and a sentence a person can act on."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds, sent as Retry-After
