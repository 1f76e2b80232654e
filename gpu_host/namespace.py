"""Saving and restoring a kernel's user namespace, for suspend and resume. Runs inside the kernel.

The host agent never imports this module: it sends this file's source text to the kernel (which
need not have gpupool installed) and calls `checkpoint` or `restore` there, with IPython's shell
and a path. So a checkpoint, a pickle, is only ever written and read by the tenant's own kernel,
as the tenant's own user.

A checkpoint file is a sequence of pickles: a header, then one record per name, `(name, "module",
module name)` or `(name, "value", cloudpickle bytes)`, then `("", "end", count)`. Each name is
pickled on its own, so one that cannot be saved or restored does not lose the others.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import operator
import os
import pickle
import sys
import time
import types
from typing import Any

FORMAT = "gpupool-namespace-1"
IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


class CheckpointError(Exception):
    """The checkpoint cannot be written or read at all (not one name of it)."""


class Answer(dict[str, Any]):
    """What `checkpoint` and `restore` return; IPython hands it to the agent as JSON."""

    def _repr_json_(self) -> dict[str, Any]:
        return dict(self)


def _reason(error: BaseException) -> str:
    return (str(error) or type(error).__name__)[:500]


def _skipped(name: str, value: Any, shell: Any) -> bool:
    """IPython's own names (In, Out, _, _i1, get_ipython, ...), and any name starting with _."""
    if name.startswith("_") or name in IPYTHON_NAMES:
        return True
    return name in shell.user_ns_hidden and shell.user_ns_hidden[name] is value


def on_cpu(obj: Any) -> Any:
    """`obj` with its data copied to the CPU if it is a GPU tensor or array, else `obj` itself.
    Only libraries the kernel has already imported are looked at; nothing is imported here."""
    if isinstance(obj, type):
        return obj  # a class that says `is_cuda = True` is not itself on a GPU
    torch, cupy, jax = (sys.modules.get(m) for m in ("torch", "cupy", "jax"))
    jax_array = getattr(jax, "Array", None)  # None where jax is not imported (or too old)
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return obj.get()
    if jax is not None and jax_array is not None and isinstance(obj, jax_array):
        on_gpu = any(d.platform != "cpu" for d in obj.devices())
        return jax.device_get(obj) if on_gpu else obj
    try:
        cuda = getattr(obj, "is_cuda", False) is True or obj.device.type == "cuda"
    except Exception:
        cuda = False
    if not cuda or not callable(getattr(obj, "cpu", None)):
        return obj
    if torch is not None and isinstance(obj, torch.Tensor):
        cpu = obj.detach().cpu()
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter(cpu, requires_grad=obj.requires_grad)
        return cpu.requires_grad_(obj.requires_grad) if cpu.is_leaf else cpu
    return obj.cpu()


def _is_open_file(obj: Any) -> bool:
    return isinstance(obj, io.IOBase) and not isinstance(obj, (io.BytesIO, io.StringIO))


@functools.cache
def _pickler() -> Any:
    import cloudpickle

    class CpuPickler(cloudpickle.Pickler):
        """cloudpickle, with GPU tensors and arrays (anywhere inside the value) saved as their
        CPU copies, and open files refused rather than saved as their contents."""

        def reducer_override(self, obj: Any) -> Any:
            cpu = on_cpu(obj)
            if cpu is not obj:
                return operator.getitem, ((cpu,), 0)  # unpickles as the CPU copy itself
            if _is_open_file(obj):
                what = "a closed file" if obj.closed else "an open file"
                name = getattr(obj, "name", "?")
                raise TypeError(f"cannot pickle {what} ({name!r}); open it again after resume")
            return super().reducer_override(obj)

    return CpuPickler


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _pickler()(buffer, protocol=5).dump(value)
    return buffer.getvalue()


def checkpoint(shell: Any, path: str) -> Answer:
    """Save the user namespace of IPython `shell` to `path` (mode 0600, written atomically)."""
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        raise CheckpointError(
            "cloudpickle is not installed in the kernel's Python: pip install cloudpickle there"
        ) from None
    start = time.perf_counter()
    saved: list[str] = []
    not_saved: dict[str, str] = {}
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    try:
        with os.fdopen(os.open(partial, flags, 0o600), "wb") as out:
            # The next cell's number too: a resumed notebook goes on counting from there.
            head = {"format": FORMAT, "python": list(sys.version_info[:3])}
            pickle.dump({**head, "execution_count": shell.execution_count}, out)
            for name, value in list(shell.user_ns.items()):
                if _skipped(name, value, shell):
                    continue
                record: tuple[str, str, Any]
                if isinstance(value, types.ModuleType):
                    record = (name, "module", value.__name__)
                else:
                    try:
                        record = (name, "value", _dumps(value))
                    except Exception as error:
                        not_saved[name] = _reason(error)
                        continue
                pickle.dump(record, out, protocol=5)
                saved.append(name)
            # The end record carries what was lost, so a restore can tell the user.
            pickle.dump(("", "end", not_saved), out)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return Answer(
        path=path,
        bytes=os.stat(path).st_size,
        saved=saved,
        not_saved=not_saved,
        kernel_seconds=time.perf_counter() - start,
    )


def _rebind(value: Any, user_ns: dict[str, Any]) -> Any:
    """A notebook function unpickles with a private copy of the globals it used; give it (and a
    notebook class's methods) the user namespace again, as if it had been defined there."""
    if isinstance(value, types.FunctionType) and value.__module__ == "__main__":
        fresh = types.FunctionType(
            value.__code__, user_ns, value.__name__, value.__defaults__, value.__closure__
        )
        fresh.__dict__.update(value.__dict__)
        fresh.__kwdefaults__ = value.__kwdefaults__
        fresh.__qualname__ = value.__qualname__
        fresh.__doc__ = value.__doc__
        fresh.__annotations__ = value.__annotations__
        return fresh
    if isinstance(value, type) and value.__module__ == "__main__":
        for key, member in list(vars(value).items()):
            if isinstance(member, types.FunctionType) and member.__module__ == "__main__":
                setattr(value, key, _rebind(member, user_ns))
    return value


def restore(shell: Any, path: str) -> Answer:
    """Put the names saved in `path` back into the user namespace of IPython `shell`."""
    start = time.perf_counter()
    restored: list[str] = []
    failed: dict[str, str] = {}
    try:
        source = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except OSError as error:
        raise CheckpointError(f"cannot open the checkpoint: {error.strerror}") from None
    with source:
        try:
            header = pickle.load(source)
        except Exception:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CheckpointError("the file is not a gpupool checkpoint")
        while True:
            try:
                name, kind, payload = pickle.load(source)
            except Exception:
                raise CheckpointError(
                    "the checkpoint file is cut short or damaged; restored so far: "
                    + json.dumps(restored)
                ) from None
            if kind == "end":
                lost = payload if isinstance(payload, dict) else {}
                break
            try:
                if kind == "module":
                    value = importlib.import_module(payload)
                else:
                    value = _rebind(pickle.loads(payload), shell.user_ns)
            except Exception as error:
                failed[name] = _reason(error)
                continue
            shell.user_ns[name] = value
            restored.append(name)
    count = header.get("execution_count")
    if isinstance(count, int) and count > shell.execution_count:
        shell.execution_count = count
    _warn_in_next_cell(shell, {**lost, **failed})
    return Answer(restored=restored, failed=failed, kernel_seconds=time.perf_counter() - start)


def _warn_in_next_cell(shell: Any, lost: dict[str, str]) -> None:
    """Print, once, in the output of the user's next cell, which variables did not come back:
    output of any other request would not be shown by a notebook front end."""
    if not lost:
        return
    names = "; ".join(f"{name} ({why})" for name, why in sorted(lost.items()))
    message = f"gpupool: the kernel was resumed, but these variables were lost: {names}\n"

    def warn(*_: Any) -> None:
        shell.events.unregister("pre_run_cell", warn)
        sys.stderr.write(message)
        sys.stderr.flush()

    shell.events.register("pre_run_cell", warn)
