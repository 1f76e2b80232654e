"""The footer of a `%%gpu` cell (application/vnd.gpupool.run+json beside a text/plain line): what
the gateway billed for each run, matching its own ledger for that companion kernel; and the
errors a cell says in one line, leaving the local kernel and its variables as they were."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import REPO, Gateway, free_port
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook
from test_gpu_magic import error_of, local_env, no_kernels_left, text_of

from jupyter_ext.companion import RUN_MIME
from jupyter_ext.magics import footer_text

SHIPPED = REPO / "jupyter-config" / "ipython-config" / "ipython_kernel_config.json"


def installed_kernel_config(folder: Path) -> str:
    """An IPython profile folder holding the kernel config gpupool installs (which loads %%gpu
    in every local kernel), for kernels of an environment where it is not installed."""
    profile = folder / "ipython" / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIPPED, profile / SHIPPED.name)
    return str(folder / "ipython")


def execute(nb: nbformat.NotebookNode, stack: Gateway, tmp_path: Path) -> nbformat.NotebookNode:
    """The notebook run by a local python3 kernel as installing gpupool leaves one: no
    `%load_ext`, only GPUPOOL_URL/GPUPOOL_TOKEN."""
    client = NotebookClient(
        nb, kernel_name="python3", timeout=60, startup_timeout=60, allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )  # fmt: skip
    client.execute(env={**local_env(stack), "IPYTHONDIR": installed_kernel_config(tmp_path)})
    return nb


def notebook(cells: list[str]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    return nb


def runs(cell: Any) -> list[dict[str, Any]]:
    """The RUN_MIME outputs of a cell: its progress lines and its footer."""
    return [
        dict(o.data[RUN_MIME])
        for o in cell.outputs
        if o.output_type == "display_data" and RUN_MIME in o.data
    ]


def usage(stack: Gateway, **query: str) -> dict[str, Any]:
    reply = stack.call("GET", "/api/usage?" + urllib.parse.urlencode(query))
    assert reply.status == 200, reply.body
    return dict(reply.body)


def test_footers_match_the_gateways_ledger(stack: Gateway, tmp_path: Path) -> None:
    cells = [
        "import numpy as np\narr = np.arange(1000.0)",
        "%%gpu\nimport time\ntime.sleep(0.5)\nscaled = arr * 2",
        "%%gpu --no-pull\nimport os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])",
        "print(scaled[-1])",
        "%%gpu --no-pull\nraise ValueError('boom')",
    ]
    done = execute(notebook(cells), stack, tmp_path).cells
    assert not [error_of(c) for c in done[:4] if error_of(c)], [text_of(c) for c in done]
    # A cell that raised on the GPU was billed too: its footer comes before the error.
    assert error_of(done[4]).ename == "ValueError"
    assert runs(done[4])[-1]["state"] == "done" and runs(done[4])[-1]["cost_usd"] > 0
    first, second = runs(done[1])[-1], runs(done[2])[-1]
    assert runs(done[1])[0]["state"] == "ready"  # the progress line, as the Lab renders it
    assert first["state"] == second["state"] == "done"
    assert first["kernel_id"] == second["kernel_id"]
    assert (first["gpu_type"], first["gpu_count"]) == ("H100", 1)
    assert first["since"] is None and second["since"], (first, second)
    assert first["sent"] == {"arr": pytest.approx(8000, abs=400)}, first
    assert first["received"]["scaled"] > 8000, first  # and the module `time`, by reference
    assert second["sent"] == {} and second["received"] == {}
    assert first["wall_seconds"] >= 0.5 and first["gpu_seconds"] >= 0.5, first
    assert first["cost_usd"] > 0 and second["cost_usd"] > 0, (first, second)
    # The same window asked of the gateway gives the same numbers.
    kernel = first["kernel_id"]
    for run in (first, second):
        window = {"kernel": kernel, "until": run["until"]}
        if run["since"]:
            window["since"] = run["since"]
        total = usage(stack, **window)["total"]
        assert run["gpu_seconds"] == pytest.approx(total["gpu_seconds"], abs=0.002), run
        assert run["cost_usd"] == pytest.approx(total["cost_usd"], abs=2e-6), run
    # The text line for clients without the Lab's renderer says the same.
    plain = [str(o.data["text/plain"]) for o in done[1].outputs if o.get("data", {}).get(RUN_MIME)]
    assert plain[-1] == footer_text(first)
    assert plain[-1].startswith("%%gpu: H100 \u00d71 · ") and "sent arr (" in plain[-1]
    assert f"${first['cost_usd']:.4f}" in plain[-1]
    # Both runs together are at most the kernel's whole bill (the idle time between is not in
    # either), and the kernel is shut down with its local kernel.
    no_kernels_left(stack)
    whole = usage(stack, kernel=kernel)["total"]
    assert first["gpu_seconds"] + second["gpu_seconds"] <= whole["gpu_seconds"] + 0.002


def test_a_footer_without_the_gateways_numbers_says_so() -> None:
    data = {"gpu_type": "A10G", "gpu_count": 2, "wall_seconds": 1.25, "gpu_seconds": None,
            "cost_usd": None, "sent": {}, "received": {"x": 1500}}  # fmt: skip
    assert footer_text(data) == (
        "%%gpu: A10G \u00d72 · 1.2 s · GPU time not known · received x (1.5 KB)"
    )


def test_errors_are_one_line_and_leave_the_local_kernel_alone(
    stack: Gateway, tmp_path: Path
) -> None:
    """A shape the pool lacks, a budget reached, a gateway down: one line each, no traceback
    through the extension, and the notebook's variables are still there after."""
    broke = stack.tenant("broke-footer", budget_usd=0)
    cells = [
        "import os\nkept = [1, 2, 3]",
        "%%gpu -t A100\nkept = None",
        "os.environ['GPUPOOL_TOKEN'] = " + json.dumps(broke),
        "%%gpu\nkept = None",
        f"os.environ['GPUPOOL_URL'] = 'http://127.0.0.1:{free_port()}'",
        "%%gpu\nkept = None",
        "print(kept)",
    ]
    done = execute(notebook(cells), stack, tmp_path).cells
    lines = {}
    for index in (1, 3, 5):
        error = error_of(done[index])
        assert error is not None and error.ename == "GatewayError", text_of(done[index])
        assert len(error.traceback) == 1, error.traceback
        lines[index] = error.traceback[0]
        assert runs(done[index]) == [], "no footer for a cell that never ran"
    assert "the pool has no A100 GPU; it has" in lines[1], lines[1]
    assert "budget" in lines[3].lower(), lines[3]
    assert "cannot reach the gateway" in lines[5], lines[5]
    assert text_of(done[6]).strip() == "[1, 2, 3]"
    assert not stack.call("GET", "/api/kernels").body
