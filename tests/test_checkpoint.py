"""Checkpoint and restore of a kernel's user namespace (the host side of idle suspend and resume):
what comes back in a new kernel, what is listed as not saved, GPU data saved as CPU data, and
paths that are refused."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest
from kernel_ws import KernelSocket, run_code

MISSING = "00000000-0000-4000-8000-000000000000"

NOTEBOOK = """
import collections
import json as js
import numpy as np
try:
    import pandas as pd
    df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
except ImportError:
    pass

arr = np.arange(12, dtype=np.float32).reshape(3, 4)
config = {"lr": 0.1, "layers": [64, 32], "nested": {"ok": True}}
counts = collections.Counter("hello")

def square(x):
    return x * x

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm2(self):
        return square(self.x) + square(self.y)

origin = Point(3, 4)

def make_adder(n):
    def add(x):
        return x + n
    return add

add5 = make_adder(5)
SCALE = 2

def scaled(x):
    return x * SCALE

_private = "not saved"
gen = (i for i in range(3))
fh = open("notes.txt", "w")
print("defined")
"""

CHECK = """
import sys
print(arr.sum(), arr.dtype, arr.shape)
print(config["nested"]["ok"], config["layers"], counts["l"])
print(square(7), origin.norm2(), isinstance(origin, Point), Point(1, 2).norm2(), add5(1))
print(js is sys.modules["json"], np is sys.modules["numpy"], js.dumps([1]))
same = "pandas" not in sys.modules or df.equals(pd.DataFrame({"a": [1, 2, 3], "b": list("xyz")}))
print(bool(same))
print(sorted(n for n in ("gen", "fh", "_private") if n in globals()))
SCALE = 10
print(scaled(2))
"""


def run(host, kernel_id: str, code: str) -> str:
    return asyncio.run(run_code(host.url, host.token, kernel_id, code))


def checkpoint(host, kernel_id: str) -> dict:
    reply = host.call("POST", f"/api/kernels/{kernel_id}/checkpoint")
    assert reply.status == 200, reply.body
    return dict(reply.body)


def restore(host, kernel_id: str, path: str) -> dict:
    reply = host.call("POST", f"/api/kernels/{kernel_id}/restore", {"path": path})
    assert reply.status == 200, reply.body
    return dict(reply.body)


@pytest.fixture(scope="module")
def saved(host):
    """Kernel A of tenant alice with a notebook's worth of names, checkpointed."""
    kernel_id = host.create(tenant="alice")["id"]
    assert run(host, kernel_id, NOTEBOOK) == "defined\n"
    time.sleep(0.3)  # the activity watch has seen the cell's last message
    before = host.call("GET", f"/api/kernels/{kernel_id}").body
    answer = checkpoint(host, kernel_id)
    after = host.call("GET", f"/api/kernels/{kernel_id}").body
    yield kernel_id, answer, before, after
    host.call("DELETE", f"/api/kernels/{kernel_id}")


def test_checkpoint_lists_what_was_saved_and_what_was_not(host, saved):
    kernel_id, answer, before, after = saved
    assert set(answer) >= {"path", "bytes", "saved", "not_saved", "seconds"}
    path = Path(answer["path"])
    assert path.name == f"{kernel_id}.pkl" and path.parent.name == "checkpoints"
    assert path.parent.parent.parent.name == "alice"  # inside the tenant's working folder
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == answer["bytes"]
    expected = {"collections", "js", "np", "arr", "config", "counts", "square", "Point", "origin",
                "make_adder", "add5", "SCALE", "scaled"}  # fmt: skip
    if importlib.util.find_spec("pandas"):
        expected |= {"pd", "df"}
    assert set(answer["saved"]) == expected
    assert answer["not_saved"] == {
        "gen": "cannot pickle 'generator' object",
        "fh": "cannot pickle an open file ('notes.txt'); open it again after resume",
    }
    # The kernel's own namespace is untouched and the checkpoint was not the user's activity.
    out = run(host, kernel_id, "print(sorted(k for k in globals() if 'gpupool' in k or k == 'g'))")
    assert out == "[]\n"
    assert after["last_activity"] == before["last_activity"]
    assert after["execution_state"] == "idle"


def test_restore_into_a_new_kernel_brings_the_namespace_back(host, saved):
    _, answer, _, _ = saved
    kernel_id = host.create(tenant="alice")["id"]
    back = restore(host, kernel_id, answer["path"])
    assert back["restored"] == answer["saved"] and back["failed"] == {}
    assert back["seconds"] > 0
    lines = run(host, kernel_id, CHECK).splitlines()
    assert lines == [
        "66.0 float32 (3, 4)",
        "True [64, 32] 2",
        "49 25 True 5 6",
        "True True [1]",
        "True",
        "[]",
        "20",  # a restored function sees the user namespace, as if defined there
    ]
    # A relative path is taken from the tenant's folder.
    relative = os.path.relpath(answer["path"], Path(answer["path"]).parents[2])
    assert restore(host, kernel_id, relative)["restored"] == answer["saved"]
    host.call("DELETE", f"/api/kernels/{kernel_id}")


def test_a_name_that_fails_to_restore_does_not_stop_the_rest(host):
    code = """
import os, sys
with open("gone_module.py", "w") as f:
    f.write("VALUE = 1\\n")
sys.path.insert(0, os.getcwd())
import gone_module
def explode():
    raise ValueError("this one cannot come back")
class Fragile:
    def __reduce__(self):
        return (explode, ())
fragile = Fragile()
kept = [1, 2, 3]
"""
    first = host.create(tenant="carol")["id"]
    run(host, first, code)
    answer = checkpoint(host, first)
    run(host, first, "os.remove('gone_module.py'); sys.modules.pop('gone_module')")
    second = host.create(tenant="carol")["id"]
    back = restore(host, second, answer["path"])
    assert back["failed"] == {
        "gone_module": "No module named 'gone_module'",
        "fragile": "this one cannot come back",
    }
    assert {"os", "sys", "explode", "Fragile", "kept"} <= set(back["restored"])
    assert answer["not_saved"] == {
        "f": "cannot pickle a closed file ('gone_module.py'); open it again after resume"
    }
    assert run(host, second, "print(kept, 'fragile' in globals())") == "[1, 2, 3] False\n"
    for kernel_id in (first, second):
        host.call("DELETE", f"/api/kernels/{kernel_id}")


GPU_STAND_IN = """
class Device:
    type = "cuda"

class FakeGpuArray:
    is_cuda = True
    device = Device()
    def __init__(self, data):
        self.data = data
    def cpu(self):
        return CpuArray(self.data)

class OnlyDeviceSaysCuda:  # no is_cuda: the device alone says where it lives
    device = Device()
    def cpu(self):
        return CpuArray("by device")

class CpuArray:
    is_cuda = False
    def __init__(self, data):
        self.data = data

weights = FakeGpuArray([1, 2, 3])
state = {"layers": [FakeGpuArray([4]), OnlyDeviceSaysCuda()], "step": 7}

def _imported_fakes():  # stand-ins for cupy and jax, as if the notebook had imported them
    import sys, types
    class ndarray:
        def get(self):
            return CpuArray("from cupy")
    class Array:
        def __init__(self, platform):
            self.platform = platform
        def devices(self):
            return {self}
    cupy, jax = types.ModuleType("cupy"), types.ModuleType("jax")
    cupy.ndarray, jax.Array = ndarray, Array
    jax.device_get = lambda array: CpuArray("from jax")
    sys.modules.update(cupy=cupy, jax=jax)
    return ndarray(), Array("gpu"), Array("cpu")

cupy_array, jax_on_gpu, jax_on_cpu = _imported_fakes()
"""


def test_gpu_data_is_saved_as_cpu_data(host):
    """Without torch: a stand-in that says it lives on a CUDA device is saved as what its .cpu()
    gives, wherever it sits in the namespace; the live object is left as it was."""
    first = host.create(tenant="dave")["id"]
    run(host, first, GPU_STAND_IN)
    answer = checkpoint(host, first)
    saved = {"weights", "state", "cupy_array", "jax_on_gpu", "jax_on_cpu"}
    assert saved <= set(answer["saved"]) and answer["not_saved"] == {}
    assert run(host, first, "print(type(weights).__name__)") == "FakeGpuArray\n"
    second = host.create(tenant="dave")["id"]
    restore(host, second, answer["path"])
    code = (
        "print(type(weights).__name__, weights.data, state['step'], "
        "[(type(x).__name__, x.data) for x in state['layers']])"
    )
    out = run(host, second, code)
    assert out == "CpuArray [1, 2, 3] 7 [('CpuArray', [4]), ('CpuArray', 'by device')]\n"
    code = "print(cupy_array.data, jax_on_gpu.data, type(jax_on_cpu).__name__)"
    assert run(host, second, code) == "from cupy from jax Array\n"
    for kernel_id in (first, second):
        host.call("DELETE", f"/api/kernels/{kernel_id}")


TORCH_CUDA_STAND_IN = """
import torch

class CudaLooking(torch.Tensor):
    \"\"\"A CPU tensor that reports a CUDA device, as a tensor on a GPU would.\"\"\"
    @property
    def is_cuda(self):
        return True
    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()

x = torch.arange(6.0).reshape(2, 3).as_subclass(CudaLooking)
w = torch.ones(3, requires_grad=True).as_subclass(CudaLooking)
model_state = {"weight": x * 2, "plain": torch.zeros(2)}

class CudaLookingParameter(torch.nn.Parameter):
    @property
    def is_cuda(self):
        return True

layer = torch.nn.Linear(3, 2)
layer.weight = CudaLookingParameter(torch.ones(2, 3))
"""


def test_torch_tensors_on_a_gpu_are_saved_on_the_cpu(host):
    pytest.importorskip("torch")
    first = host.create(tenant="erin")["id"]
    run(host, first, TORCH_CUDA_STAND_IN)
    answer = checkpoint(host, first)
    assert {"x", "w", "model_state", "layer"} <= set(answer["saved"]), answer
    second = host.create(tenant="erin")["id"]
    restore(host, second, answer["path"])
    code = (
        "print(type(x).__name__, x.tolist(), type(w).__name__, w.requires_grad, "
        "type(model_state['weight']).__name__, model_state['weight'].sum().item(), "
        "model_state['plain'].tolist())"
    )
    out = run(host, second, code)
    assert out == "Tensor [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] Tensor True Tensor 30.0 [0.0, 0.0]\n"
    code = (
        "print(type(layer.weight).__name__, layer.weight.requires_grad, "
        "[p.shape[0] for p in layer.parameters()], layer(torch.ones(3)).shape[0])"
    )
    assert run(host, second, code) == "Parameter True [2, 2] 2\n"
    for kernel_id in (first, second):
        host.call("DELETE", f"/api/kernels/{kernel_id}")


@pytest.mark.parametrize("megabytes", [1, 100])
def test_large_arrays_checkpoint_and_restore(host, capsys, megabytes):
    first = host.create(tenant="frank")["id"]
    code = (
        "import numpy as np\n"
        f"big = np.random.default_rng(0).random({megabytes} * 2**20 // 8)\n"
        "print(big.nbytes, float(big.sum()))"
    )
    made = run(host, first, code)
    start = time.perf_counter()
    answer = checkpoint(host, first)
    saving = time.perf_counter() - start
    assert answer["saved"] == ["np", "big"] and answer["bytes"] > megabytes * 2**20
    second = host.create(tenant="frank")["id"]
    start = time.perf_counter()
    back = restore(host, second, answer["path"])
    loading = time.perf_counter() - start
    assert back["restored"] == ["np", "big"]
    assert run(host, second, "print(big.nbytes, float(big.sum()))") == made
    with capsys.disabled():
        print(
            f"\n{megabytes} MiB namespace: checkpoint {saving:.3f} s (in the kernel "
            f"{answer['kernel_seconds']:.3f} s), restore {loading:.3f} s (in the kernel "
            f"{back['kernel_seconds']:.3f} s)"
        )
    for kernel_id in (first, second):
        host.call("DELETE", f"/api/kernels/{kernel_id}")


@pytest.fixture(scope="module")
def two_tenants(host, saved):
    """A kernel of alice's (where `saved` lives) and bob's checkpoint file."""
    alice = host.create(tenant="alice")["id"]
    bob = host.create(tenant="bob")["id"]
    bob_file = checkpoint(host, bob)["path"]
    yield alice, bob, bob_file, saved[1]["path"]
    for kernel_id in (alice, bob):
        host.call("DELETE", f"/api/kernels/{kernel_id}")


def test_restore_refuses_paths_outside_the_tenant_folder(host, two_tenants):
    alice, bob, bob_file, alice_file = two_tenants
    folder = Path(alice_file).parents[2]
    link = folder / "to-bob.pkl"
    link.unlink(missing_ok=True)
    link.symlink_to(bob_file)
    (folder / "not-a-checkpoint.txt").write_text("hello")
    cases = [
        (bob_file, "not inside this kernel's tenant folder"),  # another tenant's file
        (f"../bob/.gpupool/checkpoints/{bob}.pkl", "not inside"),  # the same, by ..
        (f".gpupool/../../bob/.gpupool/checkpoints/{bob}.pkl", "not inside"),
        ("/etc/passwd", "not inside"),
        ("to-bob.pkl", "not inside"),  # a link that leads out
        (str(folder), "not inside"),
        (".", "not inside"),
        ("nothing-here.pkl", "no checkpoint file"),
        ("not-a-checkpoint.txt", "not a gpupool checkpoint"),
        ("", "non-empty string"),
        ("x" * 5000, "at most 4096"),
        ("a\u0000b", "non-empty string"),
        (7, "non-empty string"),
    ]
    for path, words in cases:
        reply = host.call("POST", f"/api/kernels/{alice}/restore", {"path": path})
        assert reply.status == 400 and words in reply.body["message"], (path, reply.body)
    # Bob's kernel cannot take alice's file either, but alice's own kernel can.
    reply = host.call("POST", f"/api/kernels/{bob}/restore", {"path": alice_file})
    assert reply.status == 400
    assert restore(host, alice, alice_file)["failed"] == {}


@pytest.mark.parametrize(
    ("action", "raw", "status", "words"),
    [
        ("restore", b"not json", 400, "not valid JSON"),
        ("restore", b"[1]", 400, "must be a JSON object"),
        ("restore", b"{}", 400, "path must be"),
        ("restore", json.dumps({"path": "x", "extra": 1}).encode(), 400, "unknown field 'extra'"),
        ("restore", json.dumps({"path": "x" * 70000}).encode(), 413, "at most 65536"),
        ("checkpoint", b"{", 400, "not valid JSON"),
        ("checkpoint", json.dumps({"path": "/tmp/x"}).encode(), 400, "unknown field 'path'"),
        ("checkpoint", b"x" * 70000, 413, "at most 65536"),
    ],
)
def test_bad_bodies(host, two_tenants, action, raw, status, words):
    alice = two_tenants[0]
    reply = host.call("POST", f"/api/kernels/{alice}/{action}", raw=raw)
    assert reply.status == status and words in reply.body["message"], reply.body


@pytest.mark.parametrize("action", ["checkpoint", "restore"])
def test_unknown_kernels_and_tokens(host, two_tenants, action):
    body = {"path": "x.pkl"}
    assert host.call("POST", f"/api/kernels/{MISSING}/{action}", body).status == 404
    assert host.call("POST", f"/api/kernels/not-a-kernel/{action}", body).status == 404
    for token in ("", "wrong-token"):
        reply = host.call("POST", f"/api/kernels/{two_tenants[0]}/{action}", body, token=token)
        assert reply.status == 401


def test_a_kernel_that_dies_while_saving_is_reported(host):
    kernel_id = host.create(tenant="gina")["id"]
    run(
        host,
        kernel_id,
        "import os\nclass Bomb:\n    def __reduce__(self):\n        os._exit(3)\nb = Bomb()",
    )
    reply = host.call("POST", f"/api/kernels/{kernel_id}/checkpoint")
    assert reply.status == 500 and "died during the checkpoint" in reply.body["message"]
    host.call("DELETE", f"/api/kernels/{kernel_id}")


def test_the_agent_never_unpickles():
    """Only namespace.py, whose source runs inside the kernel, touches pickles."""
    package = Path(__file__).resolve().parent.parent / "gpu_host"
    for source in package.glob("*.py"):
        if source.name != "namespace.py":
            assert not re.search(r"\bpickle|import namespace", source.read_text()), source.name


def test_the_next_cell_after_a_restore_names_what_was_lost(host, saved):
    _, answer, _, _ = saved
    kernel_id = host.create(tenant="alice")["id"]
    restore(host, kernel_id, answer["path"])

    async def stderr_of(code: str) -> str:
        sock = await KernelSocket.open(host.url, host.token, kernel_id)
        msg_id = await sock.send("shell", "execute_request", {"code": code, "silent": False})
        text, idle = [], False
        while not idle:
            msg = await sock.recv()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
                text.append(msg["content"]["text"])
            idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
        sock.close()
        return "".join(text)

    first = asyncio.run(stderr_of("1"))
    assert "the kernel was resumed, but these variables were lost" in first
    assert "gen (cannot pickle 'generator' object)" in first
    assert asyncio.run(stderr_of("2")) == "", "the warning is shown once"
    host.call("DELETE", f"/api/kernels/{kernel_id}")


def test_a_checkpoint_file_is_deleted_by_name_and_tenant(host):
    kernel_id = host.create(tenant="hank")["id"]
    path = Path(checkpoint(host, kernel_id)["path"])
    assert path.is_file()
    for token in ("", "wrong-token"):
        reply = host.call("DELETE", f"/api/checkpoints/hank/{path.name}", token=token)
        assert reply.status == 401 and path.is_file()
    # Another tenant's name finds nothing: the file is looked for in that tenant's folder.
    assert host.call("DELETE", f"/api/checkpoints/alice/{path.name}").status == 404
    for bad, words in [
        ("hank/..%2F..%2Fhank.pkl", "not a checkpoint file name"),
        ("hank/notes.txt", "not a checkpoint file name"),
        (f"Bad_Tenant/{path.name}", "tenant"),
    ]:
        reply = host.call("DELETE", f"/api/checkpoints/{bad}")
        assert reply.status == 400 and words in reply.body["message"], reply.body
    assert path.is_file()
    # A tenant owns its folder: a link there to another tenant's checkpoints is not followed.
    ivy = host.create(tenant="ivy")["id"]
    ivy_home = path.parents[3] / "ivy"
    shutil.rmtree(ivy_home / ".gpupool", ignore_errors=True)
    (ivy_home / ".gpupool").symlink_to(path.parents[1])
    reply = host.call("DELETE", f"/api/checkpoints/ivy/{path.name}")
    assert reply.status == 400 and "not a plain folder" in reply.body["message"], reply.body
    assert path.is_file()
    host.call("DELETE", f"/api/kernels/{ivy}")
    assert host.call("DELETE", f"/api/checkpoints/hank/{path.name}").status == 204
    assert not path.exists()
    reply = host.call("DELETE", f"/api/checkpoints/hank/{path.name}")
    assert reply.status == 404 and "no checkpoint" in reply.body["message"]
    host.call("DELETE", f"/api/kernels/{kernel_id}")
