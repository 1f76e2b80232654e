"""Per-tenant Unix accounts and private folders, so one tenant's kernels cannot reach another's."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import subprocess
from pathlib import Path

from .placement import TenantSpace

TENANT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
DEFAULT_TENANT = "default"
USER_PREFIX = "gp-"


class TenantError(ValueError):
    pass


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise TenantError(
            f"tenant {name!r} is not a valid name: use 1 to 24 lower-case letters, digits or "
            "dashes, starting with a letter."
        )
    return name


class TenantSpaces:
    """Creates, on first use, each tenant's Unix user (when isolating) and private folders."""

    def __init__(self, state_dir: Path, runtime_dir: Path, isolate: bool) -> None:
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir
        self.isolate = isolate
        self._spaces: dict[str, TenantSpace] = {}
        self._lock = asyncio.Lock()
        for folder in (state_dir / "homes", runtime_dir):
            folder.mkdir(parents=True, exist_ok=True)
            # Tenants must pass through these to reach their own folder, and list nothing.
            folder.chmod(0o711 if isolate else 0o700)

    async def get(self, tenant: str | None) -> TenantSpace:
        name = check_tenant_name(tenant or DEFAULT_TENANT)
        if name in self._spaces:
            return self._spaces[name]
        async with self._lock:
            if name not in self._spaces:
                self._spaces[name] = await asyncio.to_thread(self._prepare, name)
        return self._spaces[name]

    def _prepare(self, name: str) -> TenantSpace:
        uid, gid = ensure_user(USER_PREFIX + name) if self.isolate else (os.getuid(), os.getgid())
        workdir = self.state_dir / "homes" / name
        rundir = self.runtime_dir / name
        for folder in (workdir, rundir):
            folder.mkdir(exist_ok=True)
            os.chown(folder, uid, gid)
            folder.chmod(0o700)
        return TenantSpace(name, uid, gid, workdir.resolve(), rundir.resolve())


def ensure_user(user: str) -> tuple[int, int]:
    """The uid and gid of `user`, created as an unprivileged system user with no login if new."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", user],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid
