"""The kernel Python of an isolating host: a venv that tenants' Unix users can run.

The agent's own Python often lives under a private folder (/root/.pyenv, a home of mode 0700),
which a tenant's user cannot enter, so its kernels could not start. This venv is made from the
system Python, in a folder everyone may read and only root may write, with what kernels need:
ipykernel, cloudpickle (suspend and resume), websockets, gpupool's `jupyter_ext` (`%%gpu` inside
a pool kernel) with the `gpupool` contract it imports, and, at the agent's own versions, the
libraries a notebook's variables are often made of, so that `%%gpu` can move them between the two
sides.

`python -m gpu_host.kernel_python` (run by `make install` as root) builds it, and builds it again
when those versions change; the agent, run as root, builds it if missing, else only checks that
tenants' users can run it (and brings its copies of those two up to date)."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

KERNEL_VENV = Path("/opt/gpupool/kernel-venv")
BASE_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
NEEDED = ("ipykernel", "cloudpickle", "websockets")
# Installed in the kernel venv at the agent's version wherever the agent's Python has them.
MIRRORED = ("numpy", "scipy", "pandas", "pyarrow", "torch", "jax", "jaxlib", "cupy")
NOBODY = 65534  # an unprivileged user, standing in for any tenant's
STAMP = ".gpupool-kernel-venv.json"


class KernelPythonError(RuntimeError):
    """No kernel Python that tenants' users can run; the message, one line, says why."""


def requirements() -> list[str]:
    """What the venv gets: the needed packages and the mirrored ones present here, each pinned
    to the version this Python has (the needed ones unpinned where this Python lacks them)."""
    wanted = []
    for name in (*NEEDED, *MIRRORED):
        try:
            wanted.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if name in NEEDED:
                wanted.append(name)
    return wanted


# What kernels import from gpupool: `%%gpu` (jupyter_ext) and the contract it speaks (gpupool).
KERNEL_PACKAGES = ("jupyter_ext", "gpupool")


def _package_source(name: str) -> Path:
    """An installed package's folder, found without importing it (the host never runs it)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"gpupool's {name} is not installed beside gpu_host")
    return Path(spec.origin).parent


def _fingerprint() -> str:
    """A digest of the kernel packages' .py files: are the venv's copies out of date?"""
    digest = hashlib.sha256()
    for name in KERNEL_PACKAGES:
        folder = _package_source(name)
        for path in sorted(folder.rglob("*.py")):
            relative = f"{name}/{path.relative_to(folder).as_posix()}"
            digest.update(relative.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _as_nobody(*command: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            command, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", capture_output=True,
            text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None


def base_python() -> str:
    """A system Python with venv and ensurepip that unprivileged users can run."""
    wanted = os.environ.get("GPUPOOL_BASE_PYTHON")
    for python in (wanted,) if wanted else BASE_PYTHONS:
        done = _as_nobody(python, "-c", "import ensurepip, venv")
        if done is not None and done.returncode == 0:
            return python
    raise KernelPythonError(
        f"no Python with venv that unprivileged users can run among "
        f"{', '.join((wanted,) if wanted else BASE_PYTHONS)} (apt-get install python3-venv, or "
        "set GPUPOOL_BASE_PYTHON)"
    )


def open_to_all(root: Path) -> None:
    """Everyone may read and run what is under `root`; only its owner may write. Links are
    left alone: chmod would follow them out of `root`."""
    for folder, _dirs, files in os.walk(root):
        for path in [folder, *(os.path.join(folder, f) for f in files)]:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                continue
            mode = stat.S_IMODE(info.st_mode)
            runnable = stat.S_ISDIR(info.st_mode) or mode & stat.S_IXUSR
            wanted = (mode | 0o044 | (0o011 if runnable else 0)) & ~0o022
            if wanted != mode:
                os.chmod(path, wanted)


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def _copy_packages(venv: Path) -> None:
    """Put (or replace) the venv's copy of each kernel package, whole, by a rename."""
    site = _site_packages(venv)
    for name in KERNEL_PACKAGES:
        fresh = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=site))
        shutil.copytree(
            _package_source(name), fresh / name, ignore=shutil.ignore_patterns("__pycache__")
        )
        # Compiled here, by the venv's own Python: a tenant's user cannot write __pycache__
        # there, so each of its kernels would compile the sources again at start.
        subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", str(fresh / name)],
                       capture_output=True, timeout=120, check=False)  # fmt: skip
        open_to_all(fresh)
        old = site / name
        if old.exists():
            os.rename(old, fresh / "old")
        os.rename(fresh / name, old)
        shutil.rmtree(fresh, ignore_errors=True)


def _stamp(venv: Path) -> dict[str, object]:
    try:
        found: dict[str, object] = json.loads((venv / STAMP).read_text())
        return found
    except (OSError, ValueError):
        return {}


def _usable(venv: Path) -> bool:
    info = venv.lstat()
    if info.st_uid != 0 or info.st_mode & 0o022 or not stat.S_ISDIR(info.st_mode):
        raise KernelPythonError(
            f"{venv} is not a folder only root can write, so it is not safe to run; remove it"
        )
    done = _as_nobody(str(venv / "bin" / "python"), "-c", "import ipykernel, cloudpickle")
    return done is not None and done.returncode == 0


def build(venv: Path, python: str) -> None:
    """Build the venv in its place (its scripts name their folder); removed again if it fails.
    The caller holds the lock, and nothing uses the venv before `ensure` returns it."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    venv.parent.chmod(0o755)
    try:
        made = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            raise KernelPythonError(f"{python} -m venv failed: {_last_line(made)}")
        pip = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", *requirements()],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if pip.returncode != 0:
            raise KernelPythonError(f"pip could not install the kernel packages: {_last_line(pip)}")
        _copy_packages(venv)
        stamp = {"requirements": requirements(), "packages": _fingerprint()}
        (venv / STAMP).write_text(json.dumps(stamp))
        open_to_all(venv)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1].strip() if lines else f"exit code {done.returncode}"


def ensure(venv: Path = KERNEL_VENV, refresh: bool = False) -> str:
    """The venv's Python, built first where missing or unusable (and, with `refresh`, where its
    packages are not those `requirements` names now); its gpupool packages kept current. Root
    only."""
    if os.geteuid() != 0:
        raise KernelPythonError("only root can build the kernel Python for tenants' users")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another agent may be building it right now
        stamp = _stamp(venv) if venv.exists() else {}
        outdated = refresh and stamp.get("requirements") != requirements()
        if venv.exists() and (outdated or not _usable(venv)):
            stale = venv.with_name(f".{venv.name}-stale-{os.getpid()}")
            os.rename(venv, stale)
            shutil.rmtree(stale, ignore_errors=True)
        if not venv.exists():
            print(f"kernel python: building {venv} for tenants' users (once)", flush=True)
            build(venv, base_python())
            return str(venv / "bin" / "python")
        current = _fingerprint()
        copied = all((_site_packages(venv) / name / "__pycache__").is_dir()
                     for name in KERNEL_PACKAGES)  # fmt: skip
        if stamp.get("packages") != current or not copied:
            _copy_packages(venv)
            stamp["packages"] = current
            (venv / STAMP).write_text(json.dumps(stamp))
            (venv / STAMP).chmod(0o644)
    return str(venv / "bin" / "python")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    venv = Path(args[0]) if args else KERNEL_VENV
    try:
        print(f"kernel python: {ensure(venv, refresh=True)}")
    except KernelPythonError as error:
        sys.exit(f"kernel python: {error}")


if __name__ == "__main__":
    main()
