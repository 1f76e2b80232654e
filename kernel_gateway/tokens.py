"""Tokens: 256 random bits, shown once, stored only as a digest, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_token() -> str:
    # Hex, not base64: a token starting with "-" would read as an option on a command line.
    return secrets.token_hex(32)


def digest(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def host_token(key: str, salt: str) -> str:
    """A host's token, derived from the gateway's host key and the host's salt: the database
    keeps the salt and the token's digest, so reading it gives nothing to present to a host."""
    return hmac.new(key.encode(), salt.encode(), hashlib.sha256).hexdigest()
