"""`gpupool COMMAND --help` and `--help-all`, the first things a new operator runs, for every
subcommand the package declares: each prints its usage and exits 0."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

COMMANDS = sorted(ep.name for ep in entry_points(group="gpupool.commands"))


def gpupool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupool.cli", *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_every_documented_command_is_declared() -> None:
    assert {"host", "gateway", "up", "tenant", "usage", "kernelspec", "share", "login"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("flag", ["--help", "--help-all"])
def test_gpupool_alone_lists_the_commands(flag: str) -> None:
    done = gpupool(flag)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "--help-all"])
@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_prints_its_help(command: str, flag: str) -> None:
    done = gpupool(command, flag)
    assert done.returncode == 0, f"gpupool {command} {flag} failed:\n{done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr
    text = done.stdout.lower()
    assert "usage" in text or "options" in text or "--" in text, done.stdout[:500]


def test_an_unknown_command_names_the_known_ones() -> None:
    done = gpupool("hots")
    assert done.returncode == 2
    assert "unknown command 'hots'" in done.stderr and "host" in done.stderr
