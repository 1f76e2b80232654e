"""Per-tenant Unix accounts and private folders, so one tenant's kernels cannot reach another's."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from .placement import TenantSpace

TENANT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
DEFAULT_TENANT = "default"
USER_PREFIX = "gp-"


class TenantError(ValueError):
    pass


class CannotRunKernels(RuntimeError):
    """A tenant's user cannot run the kernel Python or reach its folders; the message, one line,
    says what to do."""


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

    def home(self, name: str) -> Path:
        """The tenant's working folder (its kernels' HOME), whether made yet or not."""
        return self.state_dir / "homes" / name

    def _prepare(self, name: str) -> TenantSpace:
        uid, gid = ensure_user(USER_PREFIX + name) if self.isolate else (os.getuid(), os.getgid())
        workdir = self.home(name)
        rundir = self.runtime_dir / name
        for folder in (workdir, rundir):
            folder.mkdir(exist_ok=True)
            os.chown(folder, uid, gid)
            folder.chmod(0o700)
        return TenantSpace(name, uid, gid, workdir.resolve(), rundir.resolve())


def ensure_user(user: str) -> tuple[int, int]:
    """The uid and gid of `user`, created as an unprivileged system user with no login if new."""
    error = ""
    for attempt in range(5):
        try:
            entry = pwd.getpwnam(user)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            pass
        if attempt:
            time.sleep(0.2 * attempt)  # another agent may hold the lock on /etc/passwd
        done = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", user],
            capture_output=True, text=True,
        )  # fmt: skip
        error = done.stderr.strip().replace("\n", "; ")
    raise RuntimeError(f"could not create the Unix user {user}: {error}")


# Run as the tenant, as its kernel will be: Python must start (its standard library readable), find
# ipykernel, and reach its working folder (HOME) and run folder by their full paths.
_CHECK = """\
import importlib.util, os, sys
if importlib.util.find_spec("ipykernel") is None:
    sys.exit(3)
for code, folder in ((4, sys.argv[1]), (5, sys.argv[2])):
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        sys.exit(code)
"""
_FIX = (
    "pass --kernel-python with a Python that has ipykernel and that unprivileged users can run "
    "(no private folder such as /root above it), or run with --no-isolate"
)
_checked: set[tuple[str, int, int, Path, Path]] = set()


def check_can_run_kernels(python: str, space: TenantSpace, env: Mapping[str, str]) -> None:
    """Raise CannotRunKernels unless `python` can run a kernel as the tenant's user: start,
    import ipykernel, and reach its working and run folders. Checked once per tenant and Python."""
    key = (python, space.uid, space.gid, space.workdir, space.rundir)
    if key in _checked:
        return
    user = USER_PREFIX + space.tenant
    try:
        done = subprocess.run(
            [python, "-c", _CHECK, str(space.workdir), str(space.rundir)],
            user=space.uid, group=space.gid, extra_groups=[], cwd=space.workdir, env=dict(env),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise CannotRunKernels(
            f"kernels cannot start: tenant user {user} cannot run the kernel Python {python} "
            f"({reason}); {_FIX}"
        ) from None
    except subprocess.TimeoutExpired:
        raise CannotRunKernels(
            f"kernels cannot start: the kernel Python {python} did not start within 60 s as "
            f"tenant user {user}; {_FIX}"
        ) from None
    if done.returncode == 3:
        raise CannotRunKernels(
            f"kernels cannot start: the kernel Python {python} has no ipykernel that tenant "
            f"user {user} can import; {_FIX}"
        )
    if done.returncode in (4, 5):
        what, folder, option = (
            ("working folder", space.workdir, "--state-dir")
            if done.returncode == 4
            else ("run folder", space.rundir, "the temporary folder ($TMPDIR)")
        )
        raise CannotRunKernels(
            f"kernels cannot start: tenant user {user} cannot reach its {what} {folder}; every "
            f"folder above {option} must be searchable by others (chmod o+x)"
        )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        last = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise CannotRunKernels(
            f"kernels cannot start: the kernel Python {python} fails as tenant user {user} "
            f"({last}); {_FIX}"
        )
    _checked.add(key)
