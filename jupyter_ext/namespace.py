"""Which variables a cell reads and assigns, and which of them the GPU kernel already has."""

from __future__ import annotations

import ast
import symtable
import sys
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .agent import dump, nbytes, new_digest

# IPython's own names in a user namespace, never sent (`shell.user_ns_hidden` has the rest).
IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_ih", "_oh", "_dh"})


@dataclass
class CellNames:
    reads: set[str] = field(default_factory=set)
    writes: set[str] = field(default_factory=set)


def cell_names(source: str) -> CellNames:
    """Names the cell reads (anywhere, globals of its functions included) and names it binds at
    the top level (assignments, loop and `with` targets, imports, def and class). `source` is
    Python, after IPython's transforms; a cell that does not parse reads and binds nothing."""
    try:
        table = symtable.symtable(source, "<cell>", "exec")
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return CellNames()
    names = CellNames()
    for symbol in table.get_symbols():
        if symbol.is_referenced():
            names.reads.add(symbol.get_name())
        if symbol.is_assigned() or symbol.is_imported():
            names.writes.add(symbol.get_name())
    _nested_globals(table, names)
    for node in ast.walk(tree):  # `x += 1` reads x, though symtable only says it binds it
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            names.reads.add(node.target.id)
    return names


def _nested_globals(table: symtable.SymbolTable, names: CellNames) -> None:
    for child in table.get_children():
        for symbol in child.get_symbols():
            if symbol.is_global() and symbol.is_referenced():
                names.reads.add(symbol.get_name())
            if symbol.is_declared_global() and symbol.is_assigned():
                names.writes.add(symbol.get_name())
        _nested_globals(child, names)


def parse_names(text: str | None) -> list[str]:
    """`--push a,b` and friends: names separated by commas or spaces, each an identifier."""
    found = [n for n in (text or "").replace(",", " ").split() if n]
    bad = [n for n in found if not n.isidentifier()]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a variable name")
    return found


def digest(blobs: Iterable[Any]) -> str:
    """A content hash of a pickle and its buffers."""
    h = new_digest()
    for blob in blobs:
        h.update(blob)
    return h.hexdigest()


class RemoteValue:
    """Stands in, in the notebook, for a variable the GPU kernel kept (too large to bring back,
    or impossible to pickle). A later `%%gpu` cell that reads the name uses the real value
    there, since a RemoteValue is never sent; `.fetch()` (or `%gpu pull NAME`) brings it here."""

    def __init__(self, name: str, kernel_id: str | None, why: str) -> None:
        self.name = name
        self.kernel_id = kernel_id  # the GPU kernel that holds it
        self.why = why

    def __repr__(self) -> str:
        return (
            f"<{self.name}: left on the GPU kernel, {self.why}; {self.name}.fetch() or "
            f"`%gpu pull {self.name}` brings it here>"
        )

    def fetch(self) -> Any:
        """Bring the value here (whatever its size), put it in the notebook under its name,
        and return it."""
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None:
            raise RuntimeError("fetch() needs the IPython kernel this value came back to")
        magics = shell.magics_manager.registry.get("GpuMagics")
        companion = getattr(magics, "companion", None)
        if getattr(companion, "kernel_id", None) != self.kernel_id:
            raise RuntimeError(
                f"{self.name} stayed on a GPU kernel that has ended since; run the cell that "
                "made it again"
            )
        shell.run_line_magic("gpu", f"pull {self.name}")
        value = shell.user_ns.get(self.name)
        if isinstance(value, RemoteValue):
            raise RuntimeError(f"{self.name} could not be brought here; see the message above")
        return value

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{self.name} is a stand-in for a value left on the GPU kernel; fetch it first "
            f"with {self.name}.fetch()"
        )


@dataclass
class Payload:
    """Variables about to be sent: each name with its blobs."""

    names: list[str] = field(default_factory=list)
    items: list[list[Any]] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it could not be sent
    needs: dict[str, set[str]] = field(default_factory=dict)  # name -> packages it refers to

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def packages(self) -> set[str]:
        return set().union(*self.needs.values())


def package_recording_pickler() -> Any:
    """cloudpickle's pickler, noting the top-level package of every class it meets by name, so
    the GPU kernel can be asked beforehand whether it has them."""
    import cloudpickle

    class RecordingPickler(cloudpickle.Pickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.packages: set[str] = set()

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, types.ModuleType):
                module = obj.__name__
            elif isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType):
                module = getattr(obj, "__module__", None) or ""
            else:
                module = type(obj).__module__
            self.packages.add(module.partition(".")[0])
            return super().reducer_override(obj)

    return RecordingPickler


class SentValues:
    """What the GPU kernel holds for each name as far as this side knows: the digest of the
    value sent to it, or of the value it sent back. Unchanged values are not sent again."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.pickler = package_recording_pickler()

    def forget(self) -> None:
        self.digests.clear()

    def remember(self, name: str, value: Any, key: str | None = None) -> None:
        """A value just pulled: the kernel has it, so it is not pushed back unless it changes.
        `key` is the digest of the blobs it came in, if known: what the kernel's pickle of it
        hashes to (the same cloudpickle on both sides makes the same bytes; if a value pickles
        differently here, it is only sent again)."""
        if key is not None:
            self.digests[name] = key
            return
        try:
            self.digests[name] = digest(dump(value, self.pickler))
        except Exception:
            self.digests.pop(name, None)

    def payload(
        self,
        ns: Mapping[str, Any],
        names: Iterable[str],
        forced: set[str],
        limit: int | None = None,
    ) -> Payload:
        """Pickle each name that exists in `ns` and changed since it was last sent; a name that
        cannot be pickled is skipped (or, when `forced`, reported). Once the payload is over
        `limit` bytes (the cell is refused then), a name never sent is counted unhashed: a
        1 GB array over --max-bytes is refused at once, not after hashing it."""
        payload = Payload()
        for name in sorted(set(names)):
            if name not in ns:
                continue
            value = ns[name]
            if isinstance(value, RemoteValue):
                continue  # the GPU kernel has the real one
            try:
                stream_packages, blobs = self._dump(value)
            except Exception as error:
                payload.skipped[name] = f"{type(error).__name__}: {error}"
                continue
            size = nbytes(blobs)
            if limit is not None and payload.total + size > limit and name not in self.digests:
                payload.sizes[name] = size  # the cell is refused for its size: never sent
                continue
            key = digest(blobs)
            if self.digests.get(name) == key and name not in forced:
                continue
            payload.names.append(name)
            payload.items.append(blobs)
            payload.digests[name] = key
            payload.sizes[name] = size
            payload.needs[name] = stream_packages - _not_packages()
        return payload

    def _dump(self, value: Any) -> tuple[set[str], list[Any]]:
        import io
        import pickle

        from .agent import PROTOCOL

        buffers: list[pickle.PickleBuffer] = []
        stream = io.BytesIO()
        pickler = self.pickler(stream, protocol=PROTOCOL, buffer_callback=buffers.append)
        pickler.dump(value)
        return pickler.packages, [stream.getbuffer(), *(b.raw() for b in buffers)]

    def sent(self, payload: Payload) -> None:
        self.digests.update(payload.digests)


def _not_packages() -> set[str]:
    """Module names every Python has: the standard library, and names of dynamic objects."""
    return set(sys.stdlib_module_names) | {"__main__", "builtins", "cloudpickle", "_gpupool_agent"}


def sendable(ns: Mapping[str, Any], hidden: Iterable[str]) -> set[str]:
    """Names of the user's own variables in a namespace."""
    skip = set(hidden) | IPYTHON_NAMES
    return {n for n in ns if n not in skip and not n.startswith("_")}


def human_bytes(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def parse_size(text: str) -> int:
    """`256MB`, `1.5GB`, `500k`, `1e6`: a byte count (decimal units, as `human_bytes` prints)."""
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
             "gb": 10**9}  # fmt: skip
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgb")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in units or value < 0:
        raise ValueError(f"{text!r} is not a size; write it like 256MB, 1.5GB or 1000000")
    return int(value * units[unit])
