"""A token read from a file (or stdin), as every gpupool command that takes one reads it, so that
no secret has to go on a command line where every user of the machine can read it (ps)."""

from __future__ import annotations

import sys

MAX_BYTES = 4096  # a token is 64 characters; a file much longer is not a token file


def read_token_file(path: str, option: str, what: str) -> str:
    """The one token in `path` ("-": stdin), surrounding blank space removed. ValueError with a
    sentence naming the option and the file when it cannot be read or does not hold exactly one
    token (`what`: "tenant token", "join token")."""
    where = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read(MAX_BYTES + 1)
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_BYTES + 1)
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {option} {where}: {error}") from None
    token = text.strip()
    if len(text) > MAX_BYTES or not token or any(c.isspace() for c in token):
        raise ValueError(f"{option} {where} must hold one {what} (one line)")
    return token
