"""The one error the gateway answers with: an HTTP status and a sentence a person can act on."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
