"""`%%gpu` against a stack on real GPUs: CUDA tensors and a model's parameters come back to the
notebook as CPU copies. Skipped without an NVIDIA GPU, or without a CUDA build of torch."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import start_stack
from nbformat.v4 import new_code_cell, new_notebook
from test_gpu_magic import error_of, execute, text_of

from gpu_host.nvml import open_nvml

inventory, reason = open_nvml()
if inventory is None:
    pytest.skip(f"needs an NVIDIA GPU: {reason}", allow_module_level=True)
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs torch built with CUDA", allow_module_level=True)


def test_cuda_tensors_come_back_as_cpu_copies(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, fake_gpus="")  # real GPUs, found through NVML
    try:
        specs = stack.call("GET", "/api/kernelspecs").body["kernelspecs"].values()
        gpu_type = next(
            s["spec"]["metadata"]["gpupool"]["gpu_type"]
            for s in specs
            if s["spec"].get("metadata", {}).get("gpupool", {}).get("gpu_type")
        )
        cells = [
            "%load_ext jupyter_ext",
            f"%%gpu -t {gpu_type}\nimport torch\nt = torch.arange(4.0, device='cuda') * 2\n"
            "layer = torch.nn.Linear(2, 1).cuda()\nbatch = {'x': t, 'n': 1}\nprint(t.device)",
            "w = next(layer.parameters())\n"
            "print(t.device, t.tolist(), batch['x'].device, w.device, type(w).__name__)",
        ]
        nb = new_notebook(cells=[new_code_cell(c) for c in cells])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}  # fmt: skip
        done = execute(nb, stack, tmp_path).cells
        assert not [error_of(c) for c in done if error_of(c)], [text_of(c) for c in done]
        assert "cuda:0" in text_of(done[1])
        assert text_of(done[2]).split() == [
            "cpu", "[0.0,", "2.0,", "4.0,", "6.0]", "cpu", "cpu", "Parameter",
        ]  # fmt: skip
    finally:
        stack.stop()
