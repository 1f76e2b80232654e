"""Run Cell on GPU in a real browser, in the hybrid Lab of `gpupool up`: in a local Python
notebook the cell toolbar's GPU button adds a `%%gpu -t H100` first line and runs the cell on a
pooled GPU (a fake GPU's UUID where the local run printed None), with a badge and a footer that
names its cost; unmarking removes the line; the shape menu lists the pool's shapes; Run All runs
the marked cell on the GPU and the others here, and `jupyter execute` of the saved notebook gives
the same outputs. Screenshots docs/screenshots/cell-marked.png, cell-footer.png, shape-menu.png.
Uses Debian's chromium; skips without it, or without the built front end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from lab_stack import BUILT, gateway_kernels, lab_with_front_end, launch, new_page
from nbformat.v4 import new_code_cell, new_notebook

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
if not (BUILT / "package.json").exists():
    pytest.skip("the Lab front end is not built; `make install` builds it", allow_module_level=True)

from playwright.sync_api import Locator, Page, expect, sync_playwright  # noqa: E402
from test_run_footer import installed_kernel_config  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_MS = 60_000
WHERE = 'import os; print(os.environ.get("CUDA_VISIBLE_DEVICES"))'
UUID = re.compile(r"GPU-[0-9a-fA-F-]+")
NOTEBOOK = "cells.ipynb"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`gpupool up` with this checkout's front end, and a local Python notebook in its folder;
    its printed lines and that folder."""
    folder = tmp_path_factory.mktemp("cellgpu")
    nb = new_notebook(cells=[new_code_cell(WHERE) for _ in range(3)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}  # fmt: skip
    nbformat.write(nb, folder / NOTEBOOK)
    # Local kernels load %%gpu as where gpupool is installed: its IPython kernel config.
    with lab_with_front_end(folder, IPYTHONDIR=installed_kernel_config(folder)) as lines:
        yield {**lines, "folder": folder}


@pytest.fixture(scope="module")
def page(up: dict[str, Any]) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = new_page(browser)
        page.goto(up["lab"].replace("/lab?", f"/lab/tree/{NOTEBOOK}?"))
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        yield page
        browser.close()


def cell(page: Page, index: int) -> Locator:
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def source(page: Page, index: int) -> str:
    return "\n".join(cell(page, index).locator(".cm-line").all_inner_texts())


def stream(page: Page, index: int) -> Locator:
    stdout = "application/vnd.jupyter.stdout"
    return cell(page, index).locator(f".jp-OutputArea-output[data-mime-type='{stdout}']")


def select(page: Page, index: int) -> None:
    """Make the cell active, in command mode (its toolbar shows)."""
    cell(page, index).locator(".jp-InputPrompt").click()
    expect(cell(page, index)).to_have_class(re.compile(r"jp-mod-active"))


def run_here(page: Page, index: int) -> None:
    select(page, index)
    page.keyboard.press("Shift+Enter")


def toolbar_button(page: Page, index: int, command: str) -> Locator:
    return cell(page, index).locator(f".jp-cell-toolbar [data-command='{command}']")


def outputs_of(nb: Any) -> list[str]:
    """Each code cell's printed text, GPU UUIDs as one word (the two runs may get either)."""
    texts = []
    for c in nb.cells:
        text = "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
        texts.append(UUID.sub("GPU-<uuid>", text))
    return texts


@pytest.mark.timeout(420)
def test_run_cell_on_gpu_badge_footer_and_run_all(page: Page, up: dict[str, Any]) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    kernel = page.locator(".jp-StatusBar-Widget", has_text="Python 3 (ipykernel) | Idle")
    expect(kernel).to_have_count(1, timeout=WAIT_MS)
    run_here(page, 0)
    expect(stream(page, 0)).to_have_text("None\n", timeout=WAIT_MS)
    run_here(page, 1)
    expect(stream(page, 1)).to_have_text("None\n", timeout=WAIT_MS)

    # The toolbar's button marks the cell and runs it on a pooled H100.
    select(page, 1)
    toolbar_button(page, 1, "gpupool:run-cell-on-gpu").click()
    expect(cell(page, 1).locator(".cm-line").first).to_have_text("%%gpu -t H100", timeout=WAIT_MS)
    expect(cell(page, 1)).to_have_attribute("data-gpupool-shape", "H100 \u00d71")
    expect(stream(page, 1)).to_have_text(UUID, timeout=WAIT_MS)
    footer = cell(page, 1).locator(".gpupool-run-footer[data-state='done']")
    expect(footer).to_have_text(
        re.compile(r"^H100 \u00d71 · \d+\.\d s · \d+\.\d GPU-s billed · \$\d\.\d{4} · sent os"),
        timeout=WAIT_MS,
    )
    cell(page, 1).screenshot(path=str(SHOTS / "cell-footer.png"))
    page.screenshot(path=str(SHOTS / "cell-marked.png"))

    # Unmarked from the context menu, the line goes and the cell runs here again.
    cell(page, 1).locator(".jp-InputPrompt").click(button="right")
    page.locator(".lm-Menu-item", has_text="Run Cell Locally (remove %%gpu)").click()
    expect(cell(page, 1)).not_to_have_class(re.compile("gpupool-gpu-cell"))
    assert source(page, 1) == WHERE
    run_here(page, 1)
    expect(stream(page, 1)).to_have_text("None\n", timeout=WAIT_MS)

    # The shape menu lists the pool's shapes with price and free GPUs; picking runs there.
    select(page, 1)
    toolbar_button(page, 1, "gpupool:cell-gpu-shapes").click()
    menu = page.locator(".gpupool-shape-menu")
    expect(menu).to_contain_text(re.compile(r"H100 \u00d71 · \$\d+\.\d\d/h · \d free"))
    expect(menu).to_contain_text("H100 \u00d72")
    page.screenshot(path=str(SHOTS / "shape-menu.png"))
    menu.locator(".lm-Menu-item", has_text="H100 \u00d71").click()
    expect(stream(page, 1)).to_have_text(UUID, timeout=WAIT_MS)
    assert source(page, 1) == "%%gpu -t H100\n" + WHERE

    # Run All: the marked cell on the GPU, the others here.
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
    expect(cell(page, 2).locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"))
    expect(stream(page, 2)).to_have_text("None\n", timeout=WAIT_MS)
    expect(stream(page, 1)).to_have_text(UUID, timeout=WAIT_MS)
    expect(cell(page, 1).locator(".gpupool-run-footer[data-state='done']")).to_have_count(
        1, timeout=WAIT_MS
    )
    page.keyboard.press("Control+s")
    saved = up["folder"] / NOTEBOOK
    deadline = time.monotonic() + 30
    while "%%gpu" not in saved.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    in_lab = nbformat.read(saved, as_version=4)
    assert in_lab.cells[1].source == "%%gpu -t H100\n" + WHERE
    assert outputs_of(in_lab) == ["None\n", "GPU-<uuid>\n", "None\n"], outputs_of(in_lab)

    # The saved notebook, run headless by its kernelspec, does the same.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    env.update(GPUPOOL_URL=up["gateway"], GPUPOOL_TOKEN=up["token"],
               IPYTHONDIR=installed_kernel_config(up["folder"]))  # fmt: skip
    out = up["folder"] / "executed.ipynb"
    subprocess.run(
        [sys.executable, "-m", "jupyter", "execute", str(saved), "--output=executed"],
        env=env, check=True, timeout=180, capture_output=True,
    )  # fmt: skip
    headless = nbformat.read(out, as_version=4)
    assert outputs_of(headless) == outputs_of(in_lab)
    plain = [
        str(o.data["text/plain"]) for o in headless.cells[1].outputs
        if o.output_type == "display_data" and "application/vnd.gpupool.run+json" in o.data
    ]  # fmt: skip
    assert plain and plain[-1].startswith("%%gpu: H100 \u00d71 · "), plain
    assert json.loads(json.dumps(headless.metadata))["kernelspec"]["name"] == "python3"

    # The status bar shows the local kernel's GPU companion; Release shuts it down.
    [companion] = gateway_kernels(up)
    status = page.locator(".gpupool-status")
    expect(status).to_contain_text(
        re.compile(r"%%gpu H100 \u00d71 · idle · .*\$\d+\.\d{4} · suspends in \d+:\d\d"),
        timeout=WAIT_MS,
    )
    status.click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text(companion["id"], timeout=WAIT_MS)
    dialog.get_by_role("button", name="Release GPU (shut down)").click()
    deadline = time.monotonic() + 60
    while gateway_kernels(up) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gateway_kernels(up) == [], "released"
    expect(status).to_be_hidden(timeout=WAIT_MS)

    # The shortcut does what the button does.
    select(page, 2)
    page.keyboard.press("Control+Shift+G")
    expect(cell(page, 2)).to_have_attribute("data-gpupool-shape", "H100 \u00d71")
    expect(stream(page, 2)).to_have_text(UUID, timeout=WAIT_MS)
