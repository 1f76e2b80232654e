"""Each module of each package imports on its own, and no package's modules import each other in
a circle (issue 12): a circle means no module of it can be read, changed or tested without the
others, and Python fails it at import as soon as one of them reads a name the other has not
defined yet.

Every import counts for the graph: at module level, under TYPE_CHECKING (mypy reads it) and
inside functions (an import put there to dodge a circle is still the circle)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# `gpupool` (the contract package issue 12 asks for) is checked too once it exists.
PACKAGES = tuple(
    name
    for name in ("gpupool", "gpu_host", "kernel_gateway", "jupyter_ext")
    if (REPO / name / "__init__.py").exists()
)
# Run, not imported: `python -m` runs the command, Alembic runs its scripts with its context.
NOT_IMPORTED = ("__main__", "migrations")


def modules(package: str) -> dict[str, Path]:
    """Module name -> file, subpackages included."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the module `name` imports, anywhere in its file."""
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from . import store` imports the module store; `from .ledger import iso` reads
            # a name of the module ledger
            submodules = {f"{module}.{alias.name}" for alias in node.names} & known
            targets |= submodules
            if len(submodules) < len(node.names):
                targets.add(module)
    return {t for t in targets if t in known and t != name}


def graph(package: str) -> dict[str, set[str]]:
    found = modules(package)
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the path that closes it, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(edges[node]):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(edges):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle_among_a_packages_modules(package: str) -> None:
    found = cycle(graph(package))
    assert found is None, f"import circle in {package}: {' -> '.join(found or [])}"


def test_the_cycle_finder_names_a_circle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle(edges) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__", "a", "b", "c", "d", "sub/__init__", "sub/e"):
        (package / f"{name}.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import b\nfrom . import VERSION\n"
        "if TYPE_CHECKING:\n    from .c import X\ndef f():\n    import pkg.d\n"
        "    from .sub.e import y\n"
    )
    (package / "sub" / "e.py").write_text("from .. import a\nfrom ..b import z\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub", "pkg.sub.e"}
    assert imports("pkg.a", package / "a.py", known) == {
        "pkg", "pkg.b", "pkg.c", "pkg.d", "pkg.sub.e",
    }  # fmt: skip
    assert imports("pkg.sub.e", package / "sub" / "e.py", known) == {"pkg.a", "pkg.b"}


IMPORT_EACH_ALONE = """
import importlib, json, sys, traceback
names, packages = json.loads(sys.argv[1]), tuple(json.loads(sys.argv[2]))
failed = {}
for name in names:
    for loaded in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""


def test_each_module_imports_alone() -> None:
    """In a fresh interpreter, with none of the packages' other modules loaded first; one
    process for all (third-party modules stay loaded between them, which changes nothing)."""
    names = [
        name
        for package in PACKAGES
        for name in modules(package)
        if not set(name.split(".")) & set(NOT_IMPORTED)
    ]
    run = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_ALONE, json.dumps(names), json.dumps(PACKAGES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    failed = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{why}" for name, why in failed.items())
