"""DESIGN: gpu_host, kernel_gateway and jupyter_ext never import each other; they meet only over
the wire formats (and run each other only as commands). What they agree on lives in `gpupool`,
which each may import and which imports none of them."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("gpu_host", "kernel_gateway", "jupyter_ext")
CONTRACT = "gpupool"


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_three_packages_never_import_each_other() -> None:
    crossings = [
        f"{path.relative_to(REPO)} imports {other}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for other in sorted(imported(path) & set(PACKAGES) - {package})
    ]
    assert not crossings, crossings


def test_the_shared_contract_imports_none_of_the_three() -> None:
    files = sorted((REPO / CONTRACT).rglob("*.py"))
    assert files, f"no {CONTRACT}/ package"
    crossings = [
        f"{path.relative_to(REPO)} imports {other}"
        for path in files
        for other in sorted(imported(path) & set(PACKAGES))
    ]
    assert not crossings, crossings


def test_the_three_packages_import_the_shared_contract() -> None:
    """Each of the three takes at least the wire protocol's name from `gpupool`."""
    users = {
        package
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if CONTRACT in imported(path)
    }
    assert users == set(PACKAGES)


def test_the_shared_contract_is_in_the_wheel_checked_by_mypy_and_runs_the_command() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert set(wheel) == {CONTRACT, *PACKAGES}
    assert set(project["tool"]["mypy"]["packages"]) == {CONTRACT, *PACKAGES}
    assert project["project"]["scripts"]["gpupool"] == f"{CONTRACT}.cli:main"
    for package in (CONTRACT, *PACKAGES):
        assert (REPO / package / "py.typed").exists(), package


def test_a_jupyter_kernel_gateway_install_in_the_same_place_is_named_at_import(
    tmp_path: Path,
) -> None:
    """Jupyter Kernel Gateway's files mixed into our `kernel_gateway` folder: one clear line."""
    shutil.copytree(REPO / "kernel_gateway", tmp_path / "kernel_gateway")
    (tmp_path / "kernel_gateway" / "gatewayapp.py").write_text("# Jupyter Kernel Gateway\n")
    run = subprocess.run(
        [sys.executable, "-c", "import kernel_gateway"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "ImportError: Jupyter Kernel Gateway (jupyter-kernel-gateway) is installed in the same "
        "environment as gpupool and shares its import name `kernel_gateway`: install them in "
        "separate virtual environments."
    )
