"""The gateway's state folder and the secrets in it are its owner's alone: folder 0700, files
(database, tokens, logs) 0600, whatever the umask."""

from __future__ import annotations

import os
from pathlib import Path


def private_folder(path: Path) -> Path:
    """`path`, made if new, with mode 0700."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """`path`, made empty if new, with mode 0600 (SQLite gives its -wal and -shm files the
    database's mode, so making the database this way first covers them too)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600))
    path.chmod(0o600)
    return path


def private_log(path: Path) -> int:
    """A file descriptor appending to the log at `path`, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return fd
