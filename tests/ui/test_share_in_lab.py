"""A shared run link end to end in real browsers (Debian's chromium): tenant A shares a notebook
from its Lab with the Share button's dialog; tenant B opens the link's page and sees it rendered,
follows "Open in JupyterLab" to "Open shared notebook…" in B's own Lab, where the copy opens on
the H100 kernel shape and runs; the ledger bills that GPU time to B and none of it to A.
Screenshots docs/screenshots/share-dialog.png, share-link.png, shared-page-run-link.png and
shared-copy.png. Skips without chromium or the built front end."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from lab_stack import (
    BUILT,
    gateway,
    gateway_kernels,
    lab_with_front_end,
    launch,
    new_page,
    tenant_lab,
)
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
if not (BUILT / "package.json").exists():
    pytest.skip("the Lab front end is not built; `make install` builds it", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_MS = 90_000
WHERE = 'import os; print("GPUs:", os.environ.get("CUDA_VISIBLE_DEVICES"))'
UUID = re.compile(r"GPUs: GPU-[0-9a-fA-F-]+")
ANSWER = 'print("answer", 6 * 7)'  # A never runs it: its output in B's copy is B's run
NOTEBOOK = "fine-tune.ipynb"
H100_KERNEL = "Python 3 \u00b7 H100 \u00d71"


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`gpupool up` with A's Lab (the demo tenant) and B's own Lab against its gateway."""
    alice = tmp_path_factory.mktemp("alice")
    nb = new_notebook(cells=[new_markdown_cell("# Fine-tuning on one H100"), new_code_cell(WHERE),
                             new_code_cell(ANSWER)])  # fmt: skip
    nb.metadata["kernelspec"] = {"name": "python3-gpu-h100-x1", "display_name": H100_KERNEL,
                                 "language": "python"}  # fmt: skip
    nbformat.write(nb, alice / NOTEBOOK)
    with lab_with_front_end(alice) as up:
        admin = (alice / ".gpupool" / "admin-token").read_text().strip()
        made = gateway({**up, "token": admin}, "POST", "/api/admin/tenants", {"name": "bob"})
        bob = tmp_path_factory.mktemp("bob")
        with tenant_lab(bob, up["gateway"], made["token"]) as bob_lab:
            yield {**up, "bob_lab": bob_lab, "bob_token": made["token"], "bob_folder": bob}


def notebook_open(page: Page) -> None:
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=WAIT_MS)
    kernel = page.locator(".jp-StatusBar-Widget", has_text=f"{H100_KERNEL} | Idle")
    expect(kernel).to_have_count(1, timeout=WAIT_MS)


def output(page: Page, index: int) -> Any:
    return page.locator(".jp-Notebook .jp-CodeCell").nth(index).locator(".jp-OutputArea-output")


def billed(up: dict[str, Any], token: str) -> list[dict[str, Any]]:
    return list(gateway({**up, "token": token}, "GET", "/api/usage")["intervals"])


@pytest.mark.timeout(600)
def test_a_shares_from_lab_b_runs_its_own_copy_billed_to_b(stacks: dict[str, Any]) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            # A: the notebook on its H100 kernel, run, then the Share button's dialog.
            page = new_page(browser)
            page.goto(stacks["lab"].replace("/lab?", f"/lab/tree/{NOTEBOOK}?"))
            notebook_open(page)
            page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").first.click()
            page.keyboard.press("Shift+Enter")  # the first code cell only
            expect(output(page, 0)).to_have_text(UUID, timeout=WAIT_MS)
            page.locator(".gpupool-share-button").click()
            dialog = page.locator(".jp-Dialog")
            expect(dialog).to_contain_text("Share notebook link")
            dialog.locator("select[name='mode']").select_option("run")
            dialog.locator("select[name='access']").select_option("anyone")
            dialog.locator("select[name='expiry']").select_option(label="in 7 days")
            page.screenshot(path=str(SHOTS / "share-dialog.png"))
            dialog.get_by_role("button", name="Create link").click()
            created = page.locator(".jp-Dialog", has_text="Notebook link created")
            expect(created).to_contain_text("Run link to fine-tune.ipynb on H100", timeout=WAIT_MS)
            link = created.locator("input").input_value()
            assert re.fullmatch(re.escape(stacks["gateway"]) + r"/s/[A-Za-z0-9_-]{32}", link)
            expect(created).to_contain_text(re.compile(r"\d+ packages recorded"))
            expect(page.locator(".jp-toast-message", has_text="Creating")).to_have_count(0)
            page.screenshot(path=str(SHOTS / "share-link.png"))
            created.get_by_role("button", name="Done").click()
            # A is done: Kernel > Shut Down Kernel, and A's ledger is what A ran, closed.
            page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Shut Down Kernel$")).click()
            deadline = time.monotonic() + 60
            while gateway_kernels(stacks) or any(
                i["open"] for i in billed(stacks, stacks["token"])
            ):
                assert time.monotonic() < deadline, "A's kernel did not end"
                time.sleep(0.2)
            page.close()
            alice_before = billed(stacks, stacks["token"])

            # B: the link's page, rendered, then its Open in JupyterLab instructions.
            shared = new_page(browser, 1100, 760)
            shared.goto(link)
            expect(shared.get_by_text("Fine-tuning on one H100")).to_be_visible()
            expect(shared.locator(".gpupool-share")).to_contain_text("H100 \u00d71")
            expect(shared.locator(".gpupool-share dd", has_text="demo")).to_have_count(1)
            shared.get_by_text("Open in JupyterLab").click()
            expect(shared.locator("#open-in-jupyterlab")).to_contain_text(link)
            shared.screenshot(path=str(SHOTS / "shared-page-run-link.png"))
            shared.close()

            # B's own Lab: Open shared notebook… from the File menu, the link pasted.
            lab = new_page(browser)
            lab.goto(stacks["bob_lab"])
            lab.wait_for_selector(".jp-LauncherCard", timeout=WAIT_MS)
            lab.locator(".lm-MenuBar-itemLabel", has_text="File").click()
            lab.locator(".lm-Menu-item", has_text="Open shared notebook\u2026").click()
            asked = lab.locator(".jp-Dialog", has_text="Open shared notebook")
            asked.locator("input").fill(link)
            asked.get_by_role("button", name="Open my copy").click()
            notebook_open(lab)
            expect(lab.locator(".jp-Notebook")).to_contain_text("Fine-tuning on one H100")
            expect(lab.locator(".jp-toast-message", has_text="same")).to_contain_text(
                re.compile(r"Your kernel has the same \d+ package versions as demo's"),
                timeout=WAIT_MS,
            )
            expect(output(lab, 1)).to_have_count(0)  # shared as A saved it: not run there
            lab.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
            lab.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
            expect(output(lab, 1)).to_have_text("answer 42", timeout=WAIT_MS)
            expect(output(lab, 0)).to_have_text(UUID, timeout=WAIT_MS)
            lab.screenshot(path=str(SHOTS / "shared-copy.png"))
            copy = nbformat.read(stacks["bob_folder"] / NOTEBOOK, as_version=4)
            assert copy.metadata.kernelspec.name == "python3-gpu-h100-x1"
        finally:
            browser.close()

    # The copy's GPU time is on B's ledger, on an H100; A's ledger did not move.
    mine = billed(stacks, stacks["bob_token"])
    assert mine and all(i["gpu_type"] == "H100" for i in mine), mine
    assert billed(stacks, stacks["token"]) == alice_before
    assert not {i["kernel_id"] for i in mine} & {i["kernel_id"] for i in alice_before}
