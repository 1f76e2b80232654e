"""`%%gpu` end to end: real local ipykernels (run by nbclient, or driven directly where timing and
interrupts matter) loading `jupyter_ext`, against the embedded stack's gateway and GPU host."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import pickle
import re
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import REPO, Gateway
from jupyter_client.manager import AsyncKernelManager
from kernel_ws import KernelSocket
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook
from sqlalchemy import select

from jupyter_ext import agent
from jupyter_ext.namespace import SentValues, cell_names, parse_size
from kernel_gateway.store import Token, open_store

EXAMPLE = REPO / "examples" / "gpu-cell-magic.ipynb"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A one-pixel PNG, for the image a GPU cell displays.
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
    "rkJggg=="
)


def local_env(stack: Gateway) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    return {**env, "GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": stack.token}


def execute(nb: nbformat.NotebookNode, stack: Gateway, tmp_path: Path) -> nbformat.NotebookNode:
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=60,
        startup_timeout=60,
        allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=local_env(stack))
    return nb


def text_of(cell: Any) -> str:
    """A cell's output as text, without the footers of its %%gpu runs (tests/test_run_footer.py)."""
    parts = []
    for out in cell.outputs:
        if is_footer(out.get("data") or {}):
            continue
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(str(out.data.get("text/plain", "")))
        elif out.output_type == "error":
            parts.append(ANSI.sub("", "\n".join(out.traceback)))
    return "".join(parts)


def is_footer(data: dict[str, Any]) -> bool:
    return bool((data.get("application/vnd.gpupool.run+json") or {}).get("state") == "done")


def error_of(cell: Any) -> Any:
    errors = [o for o in cell.outputs if o.output_type == "error"]
    return errors[0] if errors else None


def no_kernels_left(stack: Gateway) -> None:
    """The local kernel's exit shut its companion down."""
    stack.wait_for(lambda: stack.call("GET", "/api/kernels").body == [], 15, "no kernels left")


# --- without the stack ------------------------------------------------------------------------


def test_cell_names_reads_and_writes() -> None:
    names = cell_names(
        "import numpy as np, os.path\nfrom m import a as b\nx = a0 + 1\ny += 2\n"
        "def f(z):\n    global g\n    g = q\n    return z + w\n"
        "class C(Base):\n    k = kk\nfor i in range(3): pass\nl = [t * s for t in T]\n"
    )
    assert names.writes == {"np", "os", "b", "x", "y", "f", "g", "C", "i", "l"}
    assert {"a0", "y", "q", "w", "Base", "kk", "range", "T", "s"} <= names.reads
    assert not {"z", "t", "k"} & names.reads
    assert cell_names("x = (").writes == set()


def test_a_stand_in_for_a_remote_value_is_never_sent() -> None:
    from jupyter_ext.namespace import RemoteValue, SentValues

    ref = RemoteValue("huge", "k1", "80.1 KB is over --max-bytes 10.0 KB")
    payload = SentValues().payload({"huge": ref, "n": 1}, {"huge", "n"}, forced={"huge"})
    assert payload.names == ["n"] and payload.skipped == {}
    assert repr(ref).startswith("<huge: left on the GPU kernel, 80.1 KB is over")
    with pytest.raises(TypeError, match=r"fetch it first with huge.fetch\(\)"):
        pickle.dumps(ref)
    # On another GPU kernel (after `%gpu release` or --fresh) it names nothing: said, not sent.
    from gpupool.wire import Shape
    from jupyter_ext.companion import Companion
    from jupyter_ext.errors import GpuTransferError
    from jupyter_ext.gateway_api import GatewayApi

    companion = Companion(GatewayApi("http://127.0.0.1:9", "t"), Shape("H100", 1))
    companion.kernel_id = "k1"
    companion.check_stand_ins({"huge": ref}, {"huge"})
    companion.kernel_id = "k2"
    with pytest.raises(GpuTransferError, match="huge stayed on a GPU kernel that has ended"):
        companion.check_stand_ins({"huge": ref, "n": 1}, {"huge", "n"})


def test_a_1gb_push_or_pull_is_refused_at_the_default_limit_naming_max_bytes() -> None:
    """At the default --max-bytes (256 MB) a 1 GB array is neither sent nor brought back, and
    the words say which option to raise. Cheap: the array's pages are never touched (calloc),
    pickling takes its buffer as it is, and a value over the limit is not hashed."""
    import numpy as np

    from gpupool.wire import Shape
    from jupyter_ext.companion import Cell, Companion
    from jupyter_ext.errors import GpuTransferError
    from jupyter_ext.gateway_api import GatewayApi
    from jupyter_ext.magics import GpuMagics
    from jupyter_ext.namespace import RemoteValue

    limit = parse_size(GpuMagics.max_bytes.default_value)
    assert limit == 256_000_000
    ns = {"big": np.zeros(125_000_000), "small": 1}  # 1 GB
    began = time.monotonic()
    payload = SentValues().payload(ns, {"big", "small"}, set(), limit=limit)
    assert time.monotonic() - began < 5 and payload.sizes["big"] > 10**9
    assert "big" not in payload.names and "big" not in payload.digests
    companion = Companion(GatewayApi("http://127.0.0.1:9", "t"), Shape("H100", 1))
    cell = Cell("big.sum()", None, {"big", "small"}, set(), [], limit)
    with pytest.raises(GpuTransferError) as refused:
        companion.check_payload(payload, cell)
    words = str(refused.value)
    assert "over --max-bytes 256.0 MB" in words and "big (1.0 GB)" in words
    assert "Nothing was sent" in words and "raise the limit with --max-bytes" in words

    # Back from the GPU kernel: the agent keeps it there and says how large it is.
    class Shell:
        user_ns = {"big": np.zeros(125_000_000)}
        execution_count = 1

        def run_cell(self, code: str, **_: Any) -> Any:
            return type("Result", (), {"error_before_exec": None, "error_in_exec": None})()

    there = agent.CellAgent(Shell(), comm=None, overrides={})
    data = {"id": "r", "names": [], "code": "pass", "count": None, "pull": ["big"],
            "max_bytes": limit}  # fmt: skip
    reply, items = there.run(data, [])
    assert reply["names"] == [] and items == [] and reply["kept"]["big"] > 10**9
    companion.kernel_id = "k1"
    here: dict[str, Any] = {}
    outcome = companion.finish(
        Cell("", None, set(), set(), ["big"], limit), SentValues().payload({}, set(), set()),
        reply, agent.Assembler([], []), here, None,
    )  # fmt: skip
    assert isinstance(here["big"], RemoteValue)
    assert outcome.notes == [
        "big stays on the GPU kernel: 1.0 GB is over --max-bytes 256.0 MB; fetch it with "
        "big.fetch() or `%gpu pull big`"
    ]


def test_payload_pieces_fit_the_hosts_websocket_limit() -> None:
    import numpy as np

    big = np.arange(3_000_000, dtype=np.float64)  # 24 MB: several pieces and messages
    items = [agent.dump(big, pickle.Pickler), agent.dump({"k": b"x" * 10}, pickle.Pickler)]
    layout, messages = agent.split(items)
    assert len(messages) >= 3
    assert all(sum(m.nbytes for m in msg) <= agent.MESSAGE_BYTES for msg in messages)
    back = agent.join(layout, [p for msg in messages for p in msg])
    loaded = agent.load(back[0])
    assert (loaded == big).all() and loaded.flags.writeable
    assert agent.load(back[1]) == {"k": b"x" * 10}
    assert parse_size("256MB") == 256_000_000 and parse_size("1.5k") == 1500
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_pieces_are_put_together_as_they_arrive() -> None:
    """The receiver copies and hashes each message's pieces as it comes; the digest it gets is
    the one the notebook side makes of the loaded value, so a variable that came back is not
    sent again unless it changes."""
    import numpy as np

    values = [np.arange(3_000_000, dtype=np.float64), {"w": np.ones(3), "n": 3}, b""]
    items = [agent.dump(v, agent.cpu_pickler_class()) for v in values]
    layout, messages = agent.split(items)
    assert len(messages) >= 3
    received = agent.Assembler(layout, agent.sizes(items), hashed=True)
    for message in messages:
        received.add(message)
    sent = SentValues()
    for name, blobs, key in zip("abc", received.finish(), received.digests(), strict=True):
        sent.remember(name, agent.load(blobs))  # the notebook side's own digest
        assert sent.digests[name] == key
    a, b, c = (agent.load(blobs) for blobs in received.finish())
    assert (a == values[0]).all() and a.flags.writeable
    assert b["n"] == 3 and b["w"].tolist() == [1.0, 1.0, 1.0] and c == b""

    short = agent.Assembler(layout, agent.sizes(items))
    short.add(messages[0])
    with pytest.raises(ValueError, match="pieces"):
        short.finish()
    wrong = agent.Assembler(layout, [[n + 1 for n in s] for s in agent.sizes(items)])
    for message in messages:
        wrong.add(message)
    with pytest.raises(ValueError, match="short"):
        wrong.finish()


def test_change_check_hash_is_xxhash_or_sha1(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "Send only when changed" hashes with xxHash's XXH3-128 where the package is installed
    (a dependency), with SHA-1 where it is not; either way a change of one byte is seen."""
    import hashlib

    import numpy as np

    from jupyter_ext.namespace import digest

    value = np.zeros(1000)
    blobs = agent.dump(value, agent.cpu_pickler_class())
    fast = importlib.util.find_spec("xxhash") is not None
    assert (agent.FAST_HASH is not None) == fast
    assert len(digest(blobs)) == (32 if fast else 40)
    monkeypatch.setattr(agent, "FAST_HASH", None)
    assert digest(blobs) == hashlib.sha1(b"".join(bytes(b) for b in blobs)).hexdigest()
    before = digest(blobs)
    value[500] = 1.0
    assert digest(agent.dump(value, agent.cpu_pickler_class())) != before


def test_gpu_tensors_are_pickled_as_cpu_copies() -> None:
    torch = pytest.importorskip("torch")

    class FakeCuda(torch.Tensor):
        """Reports a CUDA device, as a tensor on a GPU does; `.cpu()` gives a plain tensor."""

        @property
        def device(self) -> Any:
            return torch.device("cuda", 0)

        def cpu(self) -> Any:
            return self.as_subclass(torch.Tensor).clone()

    on_gpu = torch.arange(4.0).as_subclass(FakeCuda)
    blobs = agent.dump({"w": on_gpu, "n": 3}, agent.cpu_pickler_class())
    back = agent.load(blobs)
    assert type(back["w"]) is torch.Tensor and back["w"].device.type == "cpu"
    assert back["w"].tolist() == [0.0, 1.0, 2.0, 3.0] and back["n"] == 3


def test_arrays_of_an_imported_gpu_library_are_pickled_as_cpu_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same path without torch: a stand-in `cupy`, whose arrays copy to the host by `.get()`
    as CuPy's do, and which cannot be pickled themselves."""
    import types

    import numpy as np

    class ndarray:
        def __init__(self, values: list[float]) -> None:
            self.values = values

        def get(self) -> np.ndarray:
            return np.array(self.values)

        def __reduce__(self) -> Any:
            raise TypeError("a GPU array cannot be pickled")

    cupy = types.ModuleType("cupy")
    cupy.ndarray = ndarray  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    blobs = agent.dump({"a": [ndarray([1.0, 2.0])], "n": 3}, agent.cpu_pickler_class())
    back = agent.load(blobs)
    assert type(back["a"][0]) is np.ndarray and back["a"][0].tolist() == [1.0, 2.0]
    assert back["n"] == 3


# --- notebooks against the stack --------------------------------------------------------------


def test_example_notebook(stack: Gateway, tmp_path: Path) -> None:
    nb = execute(nbformat.read(EXAMPLE, as_version=4), stack, tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [error_of(c) for c in code if error_of(c)], [text_of(c) for c in code]
    # No %load_ext: gpupool's IPython kernel config loads the magic in every local kernel.
    assert "no GPU kernel yet: the next %%gpu cell starts one (H100 ×1)" in text_of(code[0])  # noqa: RUF001
    train = text_of(code[2])
    assert re.search(r"H100 ×1 GPU kernel [0-9a-f]{8} ready in", train)  # noqa: RUF001
    assert "running on GPU-" in train and "step 150: mse" in train
    assert "w[:4] = [0. 1. 2. 3.]" in text_of(code[3])
    assert "'steps': 200" in text_of(code[3])
    assert text_of(code[5]).startswith("array([")
    assert "caught here: LinAlgError Singular matrix" in text_of(code[6])
    assert "· H100 ×1 · running" in text_of(code[7])  # noqa: RUF001
    assert "shut down the H100 ×1 GPU kernel" in text_of(code[8])  # noqa: RUF001
    no_kernels_left(stack)


MAGIC_CELLS = [
    # 0: local definitions
    "%load_ext jupyter_ext\nimport os\nimport numpy as np\n\n"
    "class MyError(Exception):\n    pass\n\n"
    "class Point:\n    def __init__(self, x):\n        self.x = x\n\n"
    "    def norm(self):\n        return abs(self.x)\n\n"
    "def double(v):\n    return 2 * v\n\n"
    "arr = np.arange(6.0)\nsettings = {'scale': 3, 'tags': ['a', 'b']}\np = Point(-4)\n"
    "big = np.zeros(200_000)",
    # 1: variables in and out
    "%%gpu\nimport os\nscaled = arr * settings['scale']\nq = Point(double(p.x))\n"
    "def triple(v):\n    return 3 * v\n\nclass Remote:\n    kind = 'made on the GPU'\n\n"
    "weights = {'w': np.ones(3)}\nremote_pid = os.getpid()\nweights_id = id(weights)\n"
    "print('norm on the GPU:', q.norm())",
    # 2: back here
    "print(type(scaled).__name__, scaled.tolist(), scaled.flags.writeable)\n"
    "print(type(q) is Point, q.x, q.norm(), triple(5), Remote.kind)\n"
    "print(os.getpid() != remote_pid)",
    # 3: the same kernel; `weights` came back unchanged, so it is not sent again
    "%%gpu\nimport os\nsame_process = os.getpid() == remote_pid\n"
    "same_object = id(weights) == weights_id",
    # 4
    "print(same_process, same_object)",
    # 5: a user-defined exception, raised on line 3 of the cell
    "%%gpu\nx = 1\nraise MyError('boom', 7)",
    # 6: caught here by its own type
    "try:\n    get_ipython().run_cell_magic('gpu', '', 'raise MyError(\"again\")')\n"
    "except MyError as error:\n    print('caught', type(error) is MyError, error.args)\nprint(x)",
    # 7: an exception that does not pickle comes back as a RemoteError
    "%%gpu\nimport threading\nraise ValueError(threading.Lock())",
    # 8: the size limit
    "%%gpu --max-bytes 100KB\ntotal = big.sum() + arr.sum()",
    # 9: a GPU tensor comes back as a CPU copy (where torch is installed)
    "%%gpu\nimport torch\n\nclass FakeCuda(torch.Tensor):\n    @property\n"
    "    def device(self):\n        return torch.device('cuda', 0)\n\n"
    "    def cpu(self):\n        return self.as_subclass(torch.Tensor).clone()\n\n"
    "t = torch.arange(3.0).as_subclass(FakeCuda)\nnested = {'t': t}\n"
    "print('there:', type(t).__name__, t.device)",
    # 10
    "print('here:', type(t).__name__, t.device, type(nested['t']).__name__, t.tolist())",
    # 11: an image display is forwarded
    f"%%gpu --no-pull\nimport base64\nfrom IPython.display import Image, display\n"
    f"display(Image(data=base64.b64decode('{PNG}')))\nunpulled = 1",
    # 12
    "print('unpulled' in dir())\na1 = 'here'",
    # 13: --pull names what comes back
    "%%gpu --pull a2\na1 = 1\na2 = 2",
    # 14
    "print(type(a1).__name__, a2)\n"
    "get_ipython().run_cell_magic('gpu', '--no-pull', 'print(\"there\", a1)')",
    # 15: a version mismatch, explained before anything is sent
    "os.environ['GPUPOOL_TEST_AGENT_VERSIONS'] = '{\"python\": \"3.9.18\"}'",
    "%%gpu --fresh\nprint('never runs')",
    "del os.environ['GPUPOOL_TEST_AGENT_VERSIONS']",
    # 18: a fresh companion works again
    "%%gpu --fresh\nprint('fresh kernel', arr.sum())",
    "%gpu status",
    "%gpu usage",
    # 21: too large to bring back: it stays there, named, until pulled
    "%%gpu --max-bytes 10KB\nhuge = np.zeros(10_000)",
    "print(repr(huge))\n"
    "get_ipython().run_cell_magic('gpu', '--no-pull', 'print(\"there\", huge.shape)')\n"
    "print(huge.fetch().shape, type(huge).__name__)",
    # 23: an object whose package the GPU kernel lacks is refused before sending
    "import localonly\nthing = localonly.Thing()",
    "%%gpu\nprint(thing)",
    "%gpu release",
    "%gpu status",
]


HAVE_TORCH = importlib.util.find_spec("torch") is not None
if not HAVE_TORCH:  # the tensor cells become no-ops; the pickler tests above cover the path
    MAGIC_CELLS[9] = MAGIC_CELLS[10] = "pass"


def test_variables_errors_limits_and_versions(stack: Gateway, tmp_path: Path) -> None:
    # A module only this side has: the notebook's folder is on the local kernel's path alone.
    (tmp_path / "localonly.py").write_text("class Thing:\n    pass\n")
    nb = new_notebook(cells=[new_code_cell(c) for c in MAGIC_CELLS])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    cells = execute(nb, stack, tmp_path).cells
    text = [text_of(c) for c in cells]
    expected = (5, 7, 8, 16, 24)
    unexpected = {i: text[i] for i, c in enumerate(cells) if error_of(c) and i not in expected}
    assert not unexpected, unexpected

    assert "norm on the GPU: 8" in text[1]
    assert "ndarray [0.0, 3.0, 6.0, 9.0, 12.0, 15.0] True" in text[2]
    assert "True -8 8 15 made on the GPU" in text[2] and "True" in text[2].splitlines()[-1]
    assert text[4].strip() == "True True"

    error = error_of(cells[5])
    assert error.ename == "MyError" and error.evalue == "('boom', 7)"
    assert re.search(r"Cell In\[6\], line 3", text[5]) and "----> 3 raise MyError" in text[5]
    assert "caught True ('again',)" in text[6] and text[6].strip().endswith("1")

    remote = error_of(cells[7])
    assert remote.ename == "RemoteError" and "ValueError" in remote.evalue
    assert "Cell In[8], line 3" in text[7]

    limit = error_of(cells[8])
    assert limit.ename == "GpuTransferError"
    assert "over --max-bytes 100.0 KB" in limit.evalue and "big (1.6 MB)" in limit.evalue

    if HAVE_TORCH:
        assert "there: FakeCuda cuda:0" in text[9]
        assert "here: Tensor cpu Tensor [0.0, 1.0, 2.0]" in text[10]

    images = [o for o in cells[11].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 and images[0].data["image/png"].replace("\n", "") == PNG
    assert text[12].strip() == "False"
    # a1, bound there and not pulled, is left alone here, and the GPU kernel keeps its own
    assert text[14].split() == ["str", "2", "there", "1"]

    mismatch = error_of(cells[16])
    assert mismatch.ename == "GpuVersionMismatch"
    assert "Python 3.9.18" in mismatch.evalue and "nothing was sent" in mismatch.evalue
    assert "never runs" not in text[16]

    assert "fresh kernel 15.0" in text[18]
    assert "· H100 ×1 · running" in text[19]  # noqa: RUF001
    assert "cloudpickle" in text[19] and "suspends if idle until" in text[19]
    assert "tenant demo:" in text[20] and "this notebook's GPU kernel:" in text[20]

    assert "huge stays on the GPU kernel: 80.1 KB is over --max-bytes 10.0 KB" in text[21]
    assert "fetch it with huge.fetch() or `%gpu pull huge`" in text[21]
    # A stand-in is left here; a later %%gpu cell uses the real value there (it is not sent).
    assert text[22].splitlines() == [
        "<huge: left on the GPU kernel, 80.1 KB is over --max-bytes 10.0 KB; huge.fetch() or "
        "`%gpu pull huge` brings it here>",
        "there (10000,)",
        "pulled huge",
        "(10000,) ndarray",
    ]
    missing = error_of(cells[24])
    assert missing.ename == "GpuTransferError"
    assert "localonly is not installed in the GPU kernel" in missing.evalue
    assert "this cell sends thing, which needs it" in missing.evalue
    assert "Nothing was sent" in missing.evalue

    assert "shut down the H100 ×1 GPU kernel" in text[25]  # noqa: RUF001
    assert "no GPU kernel yet" in text[26]
    no_kernels_left(stack)


# --- timing, interrupts and the queue, observed on IOPub directly ------------------------------


class LocalKernel:
    """A local ipykernel with the gateway in its environment; cells run one at a time and
    their IOPub messages are kept with the time each arrived."""

    def __init__(self, km: AsyncKernelManager, kc: Any) -> None:
        self.km, self.kc = km, kc

    @classmethod
    async def start(cls, stack: Gateway, cwd: Path) -> LocalKernel:
        km = AsyncKernelManager(kernel_name="python3")
        await km.start_kernel(env=local_env(stack), cwd=str(cwd))
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        return cls(km, kc)

    async def run(
        self, code: str, interrupt_after: float | None = None, during: Any = None
    ) -> list[tuple[float, dict[str, Any]]]:
        msg_id = self.kc.execute(code)
        began = time.monotonic()
        seen: list[tuple[float, dict[str, Any]]] = []
        pending = []
        if interrupt_after is not None:
            pending.append(asyncio.ensure_future(self._interrupt(interrupt_after)))
        if during is not None:
            pending.append(asyncio.ensure_future(during()))
        while True:
            msg = await self.kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            seen.append((time.monotonic() - began, msg))
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        for task in pending:
            await task
        return seen

    async def _interrupt(self, after: float) -> None:
        await asyncio.sleep(after)
        await self.km.interrupt_kernel()

    async def stop(self) -> None:
        self.kc.stop_channels()
        await self.km.shutdown_kernel()


def stdout(seen: list[tuple[float, dict[str, Any]]]) -> str:
    return "".join(m["content"]["text"] for _, m in seen if m["msg_type"] == "stream")


def errors(seen: list[tuple[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [m["content"] for _, m in seen if m["msg_type"] == "error"]


def test_streaming_interrupt_and_queue(stack: Gateway, tmp_path: Path) -> None:
    asyncio.run(streaming_interrupt_and_queue(stack, tmp_path))


async def streaming_interrupt_and_queue(stack: Gateway, tmp_path: Path) -> None:
    kernel = await LocalKernel.start(stack, tmp_path)
    try:
        # Without the gateway's address, one message names both variables.
        seen = await kernel.run(
            "%load_ext jupyter_ext\nimport os\nsaved = dict(os.environ)\n"
            "del os.environ['GPUPOOL_URL'], os.environ['GPUPOOL_TOKEN']"
        )
        seen = await kernel.run("%%gpu\nprint(1)")
        (error,) = errors(seen)
        assert error["ename"] == "GpuMagicError"
        assert "GPUPOOL_URL and GPUPOOL_TOKEN are not set" in error["evalue"]
        await kernel.run("os.environ.update(saved)")

        # Both H100s taken: the cell waits in the queue, and says so, until one is free.
        holders = [stack.create(name="python3-gpu-h100-x1")["id"] for _ in range(2)]

        async def free_one() -> None:
            await asyncio.sleep(1.5)
            await asyncio.to_thread(stack.call, "DELETE", f"/api/kernels/{holders[0]}")

        seen = await kernel.run("%%gpu\nprint('got a GPU')", during=free_one)
        shown = [m["content"]["data"]["text/plain"] for _, m in seen
                 if m["msg_type"] in ("display_data", "update_display_data")
                 and not is_footer(m["content"]["data"])]  # fmt: skip
        assert "queued for H100, position 1" in shown, shown
        assert re.search(r"H100 ×1 GPU kernel [0-9a-f]{8} ready in", shown[-1])  # noqa: RUF001
        # The same lines as data for the Lab's cell footer: position and elapsed time.
        runs = [m["content"]["data"].get("application/vnd.gpupool.run+json") for _, m in seen
                if m["msg_type"] in ("display_data", "update_display_data")]  # fmt: skip
        queued = [r for r in runs if r and r["state"] == "queued"]
        assert queued and queued[0]["queue_position"] == 1 and queued[0]["gpu_type"] == "H100"
        assert queued[-1]["elapsed_seconds"] >= 1.0 and queued[0]["kernel_id"], queued
        assert [r["state"] for r in runs if r][-2:] == ["ready", "done"], runs
        assert "got a GPU" in stdout(seen)
        stack.call("DELETE", f"/api/kernels/{holders[1]}")

        # Output arrives while the cell runs, not when it ends.
        seen = await kernel.run(
            "%%gpu\nimport time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')"
        )
        first = next(t for t, m in seen if "first" in m["content"].get("text", ""))
        end = seen[-1][0]
        assert end - first >= 1.5, seen
        assert stdout(seen).index("first") < stdout(seen).index("second")

        # Interrupting the local kernel interrupts the cell on the GPU kernel.
        seen = await kernel.run(
            "%%gpu\nimport time\nfor i in range(200):\n    time.sleep(0.05)", interrupt_after=1.5
        )
        (error,) = errors(seen)
        assert error["ename"] == "KeyboardInterrupt", error
        assert seen[-1][0] < 6, seen[-1][0]
        assert "line 4" in ANSI.sub("", "\n".join(error["traceback"]))
        seen = await kernel.run("%%gpu\nprint('still there, i =', i)")
        assert re.search(r"still there, i = \d+", stdout(seen)), seen
        assert int(stdout(seen).split("= ")[1]) < 199

        # --timeout interrupts the cell there too, and says why.
        seen = await kernel.run("%%gpu --timeout 1\nimport time\ntime.sleep(10)")
        (error,) = errors(seen)
        assert error["ename"] == "GpuTimeout" and "--timeout 1 s" in error["evalue"], error
        assert seen[-1][0] < 5, seen[-1][0]

        # A companion suspended while idle resumes on the next cell, in a new process: the
        # agent is installed again and the cell runs once, with the saved variables.
        await kernel.run("%config GpuMagics.idle_timeout = 2")
        await kernel.run("%%gpu --fresh\nimport os\nkept = 41\nfirst_pid = os.getpid()")
        kernel_id = stack.call("GET", "/api/kernels").body[0]["id"]
        stack.wait_for(
            lambda: (
                stack.call("GET", f"/api/kernels/{kernel_id}").body["gpupool"]["state"]
                == "suspended"
            ),
            20,
            "the companion to be suspended",
        )
        seen = await kernel.run("%%gpu\nimport os\nprint(kept + 1, os.getpid() != first_pid)")
        assert stdout(seen) == "42 True\n", seen
    finally:
        await kernel.stop()
    no_kernels_left(stack)


def test_gpu_magic_works_inside_a_pool_cpu_kernel(stack: Gateway) -> None:
    """A kernel the gateway starts has `%%gpu` loaded, GPUPOOL_URL and a token of its own, so
    it needs no setup there; the token ends with the kernel, and no model shows it."""
    model = stack.create(name="python3")
    assert "GPUPOOL_TOKEN" not in json.dumps(model)

    async def scenario() -> tuple[str, str, str]:
        sock = await KernelSocket.open(stack.url, stack.token, model["id"])
        try:
            where, _ = await sock.execute(
                "import os\nprint(os.environ['GPUPOOL_URL'])\n"
                "print(os.environ['GPUPOOL_TOKEN'])\nprint(os.environ['CUDA_VISIBLE_DEVICES'])"
            )
            # No %load_ext: the host's kernels load jupyter_ext at start.
            ran, reply = await sock.execute(
                "%%gpu\nimport os\ngpus = os.environ['CUDA_VISIBLE_DEVICES']", timeout=120
            )
            assert reply["status"] == "ok", (ran, reply.get("ename"), reply.get("evalue"))
            back, _ = await sock.execute("print(gpus)\n%gpu release")
            return where, ran, back
        finally:
            sock.close()

    where, ran, back = asyncio.run(asyncio.wait_for(scenario(), 180))
    url, token, cpu_gpus = where.split("\n")[:3]
    assert url == stack.url and cpu_gpus == ""
    assert back.startswith("GPU-"), (ran, back)
    assert stack.call("GET", "/api/kernels", token=token).status == 200
    assert stack.call("GET", "/api/admin/tenants", token=token).status == 401  # not an admin
    assert stack.call("DELETE", f"/api/kernels/{model['id']}").status == 204
    assert stack.call("GET", "/api/kernels", token=token).status == 401
    with open_store(str(stack.state_dir / "gateway.db"))() as s:  # deleted, not piled up
        assert s.scalars(select(Token).where(Token.kernel_id == model["id"])).all() == []
    tenants = stack.call("GET", "/api/admin/tenants", token=stack.admin_token).body
    listed = [t["prefix"] for tenant in tenants for t in tenant["tokens"]]
    assert token[:6] not in listed  # a kernel's token is not the admin's to manage


def test_missing_cloudpickle_is_explained() -> None:
    """The message when the GPU kernel has no cloudpickle at all (its agent reports None)."""
    from gpupool.wire import Shape
    from jupyter_ext.companion import Companion
    from jupyter_ext.errors import GpuVersionMismatch
    from jupyter_ext.gateway_api import GatewayApi

    companion = Companion(GatewayApi("http://127.0.0.1:9", "t"), Shape("H100", 1))
    companion.remote = {**agent.versions(), "cloudpickle": None}
    with pytest.raises(GpuVersionMismatch, match="cloudpickle is not installed in the GPU kernel"):
        companion.check_versions()
    companion.remote = agent.versions()
    companion.check_versions()


def test_a_shape_the_pool_lacks_keeps_the_companion(stack: Gateway, tmp_path: Path) -> None:
    """`%%gpu -t A100` on a pool without A100 says so before anything else: the H100 companion
    and the variables that live only there stay."""
    cells = [
        "%load_ext jupyter_ext",
        "%%gpu --no-pull\nonly_there = 41",
        "%%gpu -t A100\nprint('never runs')",
        "%%gpu --no-pull\nprint('still there:', only_there + 1)",
        "%gpu release",
    ]
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    done = execute(nb, stack, tmp_path).cells
    refused = text_of(done[2])
    assert error_of(done[2]) is not None and error_of(done[2]).ename == "GatewayError", refused
    assert "python3-gpu-a100-x1" in refused and "the pool offers" in refused, refused
    assert "kernel is kept" in refused and "variables are lost" not in refused, refused
    assert "still there: 42" in text_of(done[3]), text_of(done[3])
    no_kernels_left(stack)
