"""What every bench script shares: its log line, the commit it measured, and the way it runs
(in a scratch folder, bounded in time, cleaned up on an error, Ctrl-C or SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Protocol, TypeVar

REPO = Path(__file__).resolve().parent.parent


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def commit(measured: Sequence[str]) -> str:
    """The checked-out commit, naming the measured paths that differ from it (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO, text=True, capture_output=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", *measured],
            cwd=REPO, text=True, capture_output=True, timeout=10,
        ).stdout  # not stripped: each line starts with a two-column status  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    changed = sorted({line[3:] for line in dirty.splitlines() if line.strip()})
    return f"{head}, with uncommitted changes in {', '.join(changed)}" if changed else head


def command_line() -> str:
    """How this bench was run, as a reader would type it."""
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(str(REPO)) else "python"
    script = os.path.relpath(sys.argv[0]) if Path(sys.argv[0]).exists() else sys.argv[0]
    return shlex.join([exe, script, *sys.argv[1:]])


def run_lines(machine: str, measured: Sequence[str], elapsed: float) -> list[str]:
    """The lines that head every bench's output: command, machine, commit, date, time taken."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return [f"command: `{command_line()}`", f"machine: {machine}", f"commit: {commit(measured)}",
            f"date: {now:%Y-%m-%d %H:%M UTC}", f"took: {elapsed:.0f} s"]  # fmt: skip


def describe_machine(packages: Sequence[str], gpus: str = "fake H100s") -> str:
    """One line on what the numbers were measured on: CPU, memory, OS, Python, the versions of
    `packages` (those installed), and the load average at the end of the run."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = f", {line.split(':', 1)[1].strip()}"
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024**2:.0f} GiB memory"
    load = ""
    with contextlib.suppress(OSError):
        load = f"; load average {Path('/proc/loadavg').read_text().split()[0]} at the end"
    versions = []
    for name in packages:
        with contextlib.suppress(PackageNotFoundError):
            versions.append(f"{name} {version(name)}")
    return (
        f"{cores} CPU cores usable ({os.cpu_count()} online){model}{memory}; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
        f"{', '.join(versions)}; no GPU needed ({gpus}){load}"
    )


class Started(Protocol):
    """What a bench started: stopped at the end whatever happened, its logs shown on an error."""

    async def cleanup(self) -> None: ...

    def logs(self) -> Iterable[tuple[str, Callable[[], str]]]: ...  # (what, reads its log)


S = TypeVar("S", bound=Started)


def run_main(
    prefix: str,
    start: Callable[[Path], S],
    body: Callable[[S], Awaitable[None]],
    stopping: str,
    limit: float = 900,
) -> None:
    """Run `body` on what `start` makes in a scratch folder, for at most `limit` seconds; exit
    130 when interrupted. `stopping` names what is stopped then, for the log."""

    async def run() -> None:
        with tempfile.TemporaryDirectory(prefix=prefix) as where:
            started = start(Path(where))
            task = asyncio.ensure_future(asyncio.wait_for(body(started), limit))
            # SIGTERM cleans up as Ctrl-C does; event loops without signal support skip it.
            with contextlib.suppress(NotImplementedError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            try:
                await task
            except asyncio.CancelledError:
                log(f"interrupted: stopping {stopping}")
                raise
            except Exception:
                for what, read in started.logs():
                    with contextlib.suppress(Exception):
                        log(f"log of {what}:\n{read()}")
                raise
            finally:
                await started.cleanup()

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(130)
