"""The GPU kernel's side of `%%gpu`, and the wire format both sides share.

The notebook's kernel sends this file's source to its companion GPU kernel in one silent execute
(see `install_code`); there it runs as the module `_gpupool_agent`, with nothing but the standard
library, IPython and cloudpickle, and registers the comm target `gpupool.cell`. The notebook side
imports the same helpers (`dump`, `split`, `Assembler`, `load`), so the framing is defined once.

Messages on the comm (all `comm_msg`, all answered on IOPub with the request as parent):

- agent -> notebook on open: `{"op": "hello", "python", "cloudpickle", "pid"}`.
- `{"op": "versions", "modules": [...]}` -> `{"op": "versions", "versions": {module: version}}`.
- `{"op": "part", "id", "layout", "sizes"}` with buffers: pieces of the next run's payload, in
  order.
- `{"op": "run", "id", "code", "count", "names", "layout", "sizes", "pull", "max_bytes"}` with
  the last pieces -> the cell's own IOPub output, then `{"op": "part", "layout", "sizes"}`s and
  `{"op": "done", "names", "layout", "sizes", "failed", "kept", "load_errors", "error"}`. A cell
  still running after `STARTED_AFTER_S` also gets `{"op": "started"}`, from a helper thread:
  the notebook holds output until it hears `started` or `done` (output before the agent took
  the cell, such as "No such comm" from a kernel that was resumed, is not the cell's), so a
  quick cell costs one message less on every hop and a long one still streams.

A payload is a list of items (one per variable), each a list of blobs (a protocol-5 pickle and
its out-of-band buffers); blobs are cut into pieces of at most `PIECE_BYTES` and pieces grouped
into messages of at most `MESSAGE_BYTES`, because the GPU host's websocket (tornado's default)
refuses messages over 10 MiB. `layout[i][j]` is the number of pieces of blob j of item i, and
`sizes[i][j]` its bytes. Every message of a payload carries both, so that the receiver copies
pieces into place as they arrive (`Assembler`) instead of all at once after the last one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import platform
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

TARGET = "gpupool.cell"
PROTOCOL = 5
PIECE_BYTES = 4 << 20
MESSAGE_BYTES = 8 << 20
STARTED_AFTER_S = 0.05  # a cell running this long tells the notebook it has started

Buffer = Any  # bytes, bytearray, memoryview or a zmq frame: anything with the buffer protocol


# --- the wire format, used on both sides -----------------------------------------------------


def dump(value: Any, pickler_class: Any) -> list[Buffer]:
    """`value` as blobs: its protocol-5 pickle, then its out-of-band buffers (no copies)."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    pickler_class(stream, protocol=PROTOCOL, buffer_callback=buffers.append).dump(value)
    return [stream.getbuffer(), *(b.raw() for b in buffers)]


def nbytes(blobs: Sequence[Buffer]) -> int:
    return sum(memoryview(b).nbytes for b in blobs)


def _fast_hash() -> Any:
    """xxHash's XXH3-128 constructor; None without the package (a dependency of gpupool, not of
    the GPU kernel, where this file runs too and never hashes)."""
    try:
        import xxhash
    except ImportError:
        return None
    return xxhash.xxh3_128


FAST_HASH = _fast_hash()


def new_digest() -> Any:
    """The content hash of an item: fed its blobs in order (see `namespace.digest`). It only
    tells whether a value changed since it was sent, so it need not be cryptographic: xxHash's
    XXH3 (128 bits) runs at about 11 GB/s against SHA-1's 1.5 GB/s (docs/benchmarks.md), and
    SHA-1 stands in where the `xxhash` package is missing (it beats hashlib's BLAKE2 and MD5
    here). Only the notebook's side hashes; the two never meet (their hex lengths differ)."""
    if FAST_HASH is not None:
        return FAST_HASH()
    return hashlib.sha1(usedforsecurity=False)


def sizes(items: Sequence[Sequence[Buffer]]) -> list[list[int]]:
    return [[memoryview(b).nbytes for b in blobs] for blobs in items]


def split(items: Sequence[Sequence[Buffer]]) -> tuple[list[list[int]], list[list[memoryview]]]:
    """Cut the items' blobs into pieces and the pieces into messages: the layout (pieces per blob,
    per item) and each message's buffers, in sending order; the last list goes with the header."""
    layout: list[list[int]] = []
    messages: list[list[memoryview]] = []
    current: list[memoryview] = []
    size = 0
    for blobs in items:
        counts = []
        for blob in blobs:
            view = memoryview(blob).cast("B")
            count = 0
            for start in range(0, max(len(view), 1), PIECE_BYTES):
                piece = view[start : start + PIECE_BYTES]
                if current and size + len(piece) > MESSAGE_BYTES:
                    messages.append(current)
                    current, size = [], 0
                current.append(piece)
                size += len(piece)
                count += 1
            counts.append(count)
        layout.append(counts)
    messages.append(current)
    return layout, messages


def join(layout: Sequence[Sequence[int]], pieces: Sequence[Buffer]) -> list[list[bytearray]]:
    """The items back from their pieces; blobs are writable, so arrays loaded from them are too."""
    items: list[list[bytearray]] = []
    index = 0
    for counts in layout:
        blobs = []
        for count in counts:
            views = [memoryview(p).cast("B") for p in pieces[index : index + count]]
            index += count
            blob = bytearray(sum(len(v) for v in views))
            at = 0
            for view in views:
                blob[at : at + len(view)] = view
                at += len(view)
            blobs.append(blob)
        items.append(blobs)
    if index != len(pieces):
        raise ValueError(f"the payload has {len(pieces)} pieces; its layout names {index}")
    return items


class Assembler:
    """Items rebuilt from their pieces as the messages carrying them arrive: each piece is copied
    into its blob at once (and, with `hashed`, fed to its item's digest), so that the work
    overlaps the transfer and each message can be freed. `join` in one go."""

    def __init__(
        self, layout: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]], hashed: bool = False
    ) -> None:
        self.error = ""
        if [len(c) for c in layout] != [len(s) for s in sizes]:
            self.error = "the payload's layout and sizes do not match"
            layout = sizes = []
        self.items = [[bytearray(n) for n in blob_sizes] for blob_sizes in sizes]
        self.places = [(i, j) for i, counts in enumerate(layout)
                       for j, count in enumerate(counts) for _ in range(count)]  # fmt: skip
        self.hashes = [new_digest() for _ in self.items] if hashed else None
        self.received = 0  # pieces
        self.offset = 0  # in the blob being filled

    def add(self, pieces: Sequence[Buffer]) -> None:
        for piece in pieces:
            if self.error:
                return
            if self.received >= len(self.places):
                self.error = f"the payload has more pieces than its layout's {len(self.places)}"
                return
            i, j = self.places[self.received]
            if self.received and self.places[self.received - 1] != (i, j):
                if not self._filled(self.received - 1):
                    return
                self.offset = 0
            view = memoryview(piece).cast("B")
            blob = self.items[i][j]
            end = self.offset + len(view)
            if end > len(blob):
                self.error = f"a piece overruns blob {j} of item {i} ({len(blob)} bytes)"
                return
            blob[self.offset : end] = view
            if self.hashes is not None:
                self.hashes[i].update(view)
            self.offset = end
            self.received += 1

    def _filled(self, index: int) -> bool:
        """Whether the blob of piece `index`, the last one written to, is full."""
        i, j = self.places[index]
        if self.offset != len(self.items[i][j]):
            self.error = f"blob {j} of item {i} is short"
        return not self.error

    def finish(self) -> list[list[bytearray]]:
        """The items; raises ValueError if the pieces did not fill them exactly."""
        count = len(self.places)
        if not self.error and self.received != count:
            self.error = f"the payload has {self.received} pieces; its layout names {count}"
        if not self.error and count:
            self._filled(count - 1)
        if self.error:
            raise ValueError(self.error)
        return self.items

    def digests(self) -> list[str]:
        return [h.hexdigest() for h in self.hashes or []]


def load(blobs: Sequence[Buffer]) -> Any:
    return pickle.loads(blobs[0], buffers=blobs[1:])


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# --- versions ---------------------------------------------------------------------------------


def versions(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What decides whether a pickle made on one side loads on the other."""
    try:
        import cloudpickle

        cloudpickle_version: str | None = cloudpickle.__version__
    except ImportError:
        cloudpickle_version = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cloudpickle": cloudpickle_version,
        "pid": os.getpid(),
    }
    info.update(overrides or {})
    return info


def package_versions(modules: Sequence[str]) -> dict[str, str | None]:
    """Each top-level package's version here ("" when installed without one), None if missing."""
    import importlib.util

    found: dict[str, str | None] = {}
    for name in modules:
        module = sys.modules.get(name)
        if module is None:
            try:
                if importlib.util.find_spec(name) is None:
                    found[name] = None
                    continue
            except (ImportError, ValueError):
                found[name] = None
                continue
        found[name] = _version_of(name, module)
    return found


def _version_of(name: str, module: Any) -> str:
    version = getattr(module, "__version__", None) if module is not None else None
    if isinstance(version, str):
        return version
    try:
        from importlib import metadata

        distributions = metadata.packages_distributions().get(name, [name])
        return metadata.version(distributions[0])
    except Exception:
        return ""


# --- GPU tensors and arrays come back as CPU copies --------------------------------------------


def to_cpu(obj: Any) -> Any:
    """A CPU copy of a torch/cupy/jax object that lives on a GPU, else None. Looks only at
    libraries the kernel has imported already."""
    modules = sys.modules
    torch = modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return None
        copy = obj.detach().cpu()
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter(copy, requires_grad=obj.requires_grad)
        if obj.requires_grad and obj.is_leaf:
            copy.requires_grad_(True)
        return copy
    cupy = modules.get("cupy")
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return obj.get()
    jax: Any = modules.get("jax")
    jax_array = getattr(jax, "Array", None) if jax is not None else None
    if jax_array is not None and isinstance(obj, jax_array):
        devices = obj.devices() if hasattr(obj, "devices") else set()
        if any(getattr(d, "platform", "cpu") != "cpu" for d in devices):
            import numpy

            return numpy.asarray(jax.device_get(obj))
    return None


def cpu_pickler_class() -> Any:
    """cloudpickle's pickler, writing GPU tensors and arrays (anywhere in a value) as CPU ones."""
    import cloudpickle

    class CpuPickler(cloudpickle.Pickler):
        moved = 0

        def reducer_override(self, obj: Any) -> Any:
            copy = to_cpu(obj)
            if copy is not None:
                self.moved += 1
                return copy.__reduce_ex__(PROTOCOL)
            return super().reducer_override(obj)

    return CpuPickler


# --- the agent in the GPU kernel --------------------------------------------------------------


class CellAgent:
    """One comm from one notebook kernel: receives variables and a cell, runs the cell in the
    kernel's own shell (so its output streams on IOPub as it happens), sends variables back."""

    def __init__(self, shell: Any, comm: Any, overrides: dict[str, Any]) -> None:
        self.shell = shell
        self.comm = comm
        self.overrides = overrides
        self.incoming: dict[str, Assembler] = {}  # run id -> its payload, as it arrives
        self.pickler = cpu_pickler_class()
        self.notice = StartedNotice(self.send_started)

    def hello(self) -> None:
        self.comm.send({"op": "hello", **versions(self.overrides)})

    def on_msg(self, msg: dict[str, Any]) -> None:
        data = msg["content"]["data"]
        buffers = list(msg.get("buffers") or [])
        op = data.get("op")
        if op == "part":
            self.receive(data).add(buffers)
        elif op == "versions":
            self.comm.send({"op": "versions", "versions": package_versions(data["modules"])})
        elif op == "run":
            payload = self.receive(data)
            self.incoming.clear()  # pieces of a run the notebook gave up sending
            self.notice.arm(msg, data["id"])
            try:
                payload.add(buffers)
                reply, items = self.run(data, payload.finish())
            except BaseException as problem:  # an interrupt between steps still gets an answer
                error, _ = self.error(problem)
                reply, items = {"op": "done", "id": data["id"], "error": error}, []
            finally:
                self.notice.disarm()
            self.send(reply, items)

    def send_started(self, parent: dict[str, Any], run_id: str) -> None:
        """`started` from the notice's thread: the comm's own send takes its parent from the
        main thread's context, so this names the parent itself."""
        kernel = self.comm.kernel
        content = {"comm_id": self.comm.comm_id, "data": {"op": "started", "id": run_id}}
        kernel.session.send(
            kernel.iopub_socket, "comm_msg", content, parent=parent, ident=self.comm.topic
        )

    def receive(self, data: dict[str, Any]) -> Assembler:
        """The payload of the run `data` belongs to, started by its first message."""
        payload = self.incoming.get(data["id"])
        if payload is None:
            payload = Assembler(data.get("layout") or [], data.get("sizes") or [])
            self.incoming[data["id"]] = payload
        return payload

    def send(self, reply: dict[str, Any], items: list[list[Buffer]]) -> None:
        layout, messages = split(items)
        shape = {"layout": layout, "sizes": sizes(items)}
        for buffers in messages[:-1]:
            self.comm.send({"op": "part", "id": reply["id"], **shape}, buffers=buffers)
        self.comm.send({**reply, **shape}, buffers=messages[-1])

    def run(self, data: dict[str, Any], sent: list[list[bytearray]]) -> tuple[dict[str, Any], Any]:
        ns = self.shell.user_ns
        reply: dict[str, Any] = {"op": "done", "id": data["id"], "names": [], "error": None}
        load_errors = {}
        for name, blobs in zip(data["names"], sent):  # noqa: B905
            try:
                ns[name] = load(blobs)
            except Exception as problem:
                load_errors[name] = describe(problem)
        if load_errors:
            reply["load_errors"] = load_errors
            return reply, []
        error, error_blobs = self.execute(data["code"], data.get("count"))
        reply["error"] = error
        items: list[list[Buffer]] = []
        if error is not None and error["type"] == "KeyboardInterrupt":
            if error_blobs is not None:  # the user wants the kernel back now: nothing pulled
                error["item"] = 0
                items.append(error_blobs)
            return reply, items
        failed, kept = {}, {}
        for name in data["pull"]:
            if name not in ns:
                continue
            try:
                blobs = dump(ns[name], self.pickler)
            except Exception as problem:
                failed[name] = describe(problem)
                continue
            size = nbytes(blobs)
            if size > data["max_bytes"]:
                kept[name] = size
                continue
            reply["names"].append(name)
            items.append(blobs)
        reply["failed"], reply["kept"] = failed, kept
        if error is not None and error_blobs is not None:
            error["item"] = len(items)
            items.append(error_blobs)
        return reply, items

    def execute(
        self, code: str, count: int | None
    ) -> tuple[dict[str, Any] | None, list[Buffer] | None]:
        """Run the cell as the notebook's cell number `count`, so a traceback reads
        "Cell In[count], line N"; the traceback is captured, not published here."""
        shell = self.shell
        captured: list[list[str]] = []
        saved_count = shell.execution_count
        shell._showtraceback = lambda etype, evalue, stb: captured.append(stb)
        if count:
            shell.execution_count = count
        exc: BaseException | None
        try:
            result = shell.run_cell(code, store_history=False, silent=False)
            exc = result.error_before_exec or result.error_in_exec
        except KeyboardInterrupt as interrupt:  # between IPython's own handlers
            exc = interrupt
            captured.append(traceback.format_exception(type(exc), exc, exc.__traceback__))
        finally:
            del shell._showtraceback
            shell.execution_count = saved_count
            for stream in (sys.stdout, sys.stderr):
                # ipykernel's flush waits for its IOPub thread, a thread round trip each; a
                # stream with nothing waiting to go out (`_flush_pending` false: no write since
                # its last flush) needs none, and the answer still goes out after its output.
                if stream is not None and getattr(stream, "_flush_pending", True):
                    stream.flush()
        if exc is None:
            return None, None
        error, blobs = self.error(exc)
        if captured:
            error["traceback"] = captured[-1]
        return error, blobs

    def error(self, exc: BaseException) -> tuple[dict[str, Any], list[Buffer] | None]:
        """The exception in words (always) and pickled (when it pickles)."""
        error: dict[str, Any] = {
            "type": type(exc).__name__,
            "module": type(exc).__module__,
            "message": str(exc),
            "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
        }
        try:
            blobs: list[Buffer] | None = dump(exc, self.pickler)
        except Exception:
            blobs = None
        return error, blobs


class StartedNotice:
    """Calls `send(parent, run_id)` once a cell has run `after` seconds, unless disarmed first.
    One thread per agent. It is woken only when it sleeps with nothing due: cells that follow
    each other quickly find it in a timed wait already, and it sees the new due time then."""

    def __init__(self, send: Any, after: float = STARTED_AFTER_S) -> None:
        self.send = send
        self.after = after
        self.due: tuple[float, dict[str, Any], str] | None = None
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None
        self.sleeping = False  # in a wait with no time limit

    def arm(self, parent: dict[str, Any], run_id: str) -> None:
        with self.changed:
            self.due = (time.monotonic() + self.after, parent, run_id)
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self.watch, name="gpupool-started", daemon=True
                )
                self.thread.start()
            elif self.sleeping:
                self.changed.notify()

    def disarm(self) -> None:
        with self.changed:
            self.due = None

    def watch(self) -> None:
        while True:
            with self.changed:
                while self.due is None or self.due[0] > time.monotonic():
                    self.sleeping = self.due is None
                    self.changed.wait(None if self.due is None else self.due[0] - time.monotonic())
                    self.sleeping = False
                _, parent, run_id = self.due
                self.due = None
            try:
                self.send(parent, run_id)
            except Exception:  # the kernel is going away; the cell's done still answers it
                pass


def install(shell: Any, overrides: dict[str, Any]) -> None:
    """Register the comm target; each notebook-side comm gets its own `CellAgent`."""

    def open_comm(comm: Any, msg: dict[str, Any]) -> None:
        agent = CellAgent(shell, comm, overrides)
        comm.on_msg(agent.on_msg)
        agent.hello()

    shell.kernel.comm_manager.register_target(TARGET, open_comm)


def install_code(overrides: dict[str, Any] | None = None) -> str:
    """The silent execute that installs this file in a kernel as the module `_gpupool_agent`."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    return (
        "def _gpupool_install():\n"
        "    import sys, types\n"
        "    module = types.ModuleType('_gpupool_agent')\n"
        "    sys.modules['_gpupool_agent'] = module\n"
        f"    exec(compile({source!r}, '<gpupool agent>', 'exec'), module.__dict__)\n"
        f"    module.install(get_ipython(), {overrides or {}!r})\n"
        "_gpupool_install()\n"
        "del _gpupool_install\n"
    )
