"""The host token: the only credential the agent accepts, in `Authorization: token T`."""

from __future__ import annotations

import hmac
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web


class HostTokenIdentityProvider(IdentityProvider):
    """Accepts any of the host's tokens (its own, and the one the gateway issued at
    registration), compared in constant time; anything else is 401, with no login page."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.accepted: list[str] = []

    def accept(self, token: str) -> None:
        if token and token not in self.accepted:
            self.accepted.append(token)

    async def get_user(self, handler: web.RequestHandler) -> User:
        given = self.get_token(handler) or ""
        if any(hmac.compare_digest(given.encode(), t.encode()) for t in self.accepted):
            handler._token_authenticated = True  # type: ignore[attr-defined]
            return User(username="gateway")
        if not given:
            raise web.HTTPError(
                401, "this host needs its host token: send 'Authorization: token T'."
            )
        raise web.HTTPError(401, "the host token is wrong; use the token the host agent printed.")

    @property
    def auth_enabled(self) -> bool:
        return True

    def get_handlers(self) -> list[Any]:
        return []  # no login or logout pages: the agent is an API for the gateway
