"""The Lab extension in a real browser, in the Lab of `gpupool up` (hybrid mode, as `make demo`
starts it): the launcher shows the user's local Python beside the pool's "H100 x1" with its
price; a notebook started from that card gets a fake GPU and the status bar shows its state and a
cost that ticks; the usage panel draws its chart; the picker switches the notebook to a shape
that must queue, and a notification says when its GPUs are the kernel's; left idle, the kernel is
suspended (the status bar and a notification say so) and the next cell resumes it with its
variables; meanwhile a local kernel runs in another tab.
Screenshots go to docs/screenshots/ (the README shows them). Uses Debian's chromium; skips
without it, or without the built front end (`make install` builds it)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab_stack import BUILT, NOTEBOOK, gateway, lab_page, lab_with_front_end, run_cell

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
if not (BUILT / "package.json").exists():
    pytest.skip("the Lab front end is not built; `make install` builds it", allow_module_level=True)

from playwright.sync_api import Page, expect  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_MS = 60_000
IDLE_S = 20  # every pool kernel of this Lab is suspended after this long idle
RESULT = '.jp-OutputArea-output[data-mime-type="text/plain"]'  # not a stream


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with lab_with_front_end(
        tmp_path_factory.mktemp("labext"), KERNEL_IDLE_TIMEOUT=str(IDLE_S)
    ) as lines:
        yield lines


@pytest.fixture(scope="module")
def page(up: dict[str, Any]) -> Iterator[Page]:
    with lab_page(up["lab"]) as page:
        yield page


def cost(text: str) -> float:
    match = re.search(r"\$(\d+\.\d+)", text)
    assert match, text
    return float(match.group(1))


@pytest.mark.timeout(300)
def test_launcher_status_bar_and_usage_panel(page: Page, up: dict[str, Any]) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    card = page.locator('.jp-LauncherCard[data-category="GPU pool"]').filter(
        has_text="H100 \u00d71"
    )
    expect(card).to_have_count(1, timeout=WAIT_MS)
    label = card.inner_text()
    assert re.search(r"H100 \u00d71 · 80 GB · \$\d+\.\d\d/h · 2 free", label), label
    # The user's own Python, beside the pool's shapes (hybrid mode: not the pool's CPU kernel).
    expect(page.locator('.jp-LauncherCard[data-category="Notebook"][title^="Python 3 (ipykernel)"]')
           ).to_have_count(1)  # fmt: skip
    # Each shape once: the Notebook section's cards of the pool's kernelspecs are hidden (the
    # GPU pool section shows them with price and what is free); their Console cards stay.
    notebook_cards = page.locator('.jp-LauncherCard[data-category="Notebook"]:visible')
    expect(notebook_cards).to_have_count(1, timeout=WAIT_MS)
    console_card = '.jp-LauncherCard[data-category="Console"][title="Python 3 \u00b7 H100 \u00d71"]'
    expect(page.locator(console_card)).to_be_visible()
    page.screenshot(path=str(SHOTS / "launcher.png"))

    card.click()
    status = page.locator(".gpupool-status")
    expect(status).to_contain_text("GPU H100 \u00d71", timeout=WAIT_MS)
    expect(status).to_contain_text(re.compile(r"· (idle|running) ·"), timeout=WAIT_MS)
    page.locator(f"{NOTEBOOK} .jp-Cell .cm-content").first.click()
    page.keyboard.type('import os; os.environ["CUDA_VISIBLE_DEVICES"]')
    page.keyboard.press("Shift+Enter")
    output = page.locator(f"{NOTEBOOK} .jp-OutputArea-output").first
    expect(output).to_contain_text("GPU-", timeout=WAIT_MS)  # the fake GPU's UUID
    first = cost(status.inner_text())
    time.sleep(2.5)
    text = status.inner_text()
    assert cost(text) > first, (first, text)  # ticks each second while the GPU is held
    assert "suspends in" in text, text
    page.screenshot(path=str(SHOTS / "status-bar.png"))

    # Lab's own Select Kernel dialog (the toolbar's kernel name) is the table: local kernels,
    # the pool's shapes with price and what picking each will do, and No Kernel.
    page.locator(f"{NOTEBOOK} .jp-Toolbar-kernelName").click()
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    rows = dialog.locator(".gpupool-picker tbody tr")
    expect(rows).to_have_count(4, timeout=WAIT_MS)
    expect(rows.filter(has_text="Python 3 (ipykernel)")).to_contain_text("on this machine")
    expect(rows.filter(has_text="H100 \u00d72")).to_contain_text("queued, position 1")
    one = rows.filter(has_text="H100 \u00d71")
    expect(one).to_contain_text(re.compile(r"80 GB\$\d+\.\d\d/h"))
    expect(one.locator("input")).to_be_checked()  # the kernel the notebook has
    expect(rows.last).to_contain_text("No Kernel")
    page.screenshot(path=str(SHOTS / "select-kernel.png"))
    dialog.locator(".jp-Dialog-button", has_text="Cancel").click()
    expect(dialog).to_have_count(0)

    page.locator('.lm-MenuBar-itemLabel:text("View")').click()
    expect(page.locator(".lm-Menu-itemLabel", has_text="GPU Pool: Show Usage")).to_be_visible()
    page.keyboard.press("Escape")
    page.keyboard.press("Control+Shift+C")
    page.keyboard.type("GPU Pool: Show Usage")
    page.keyboard.press("Enter")
    panel = page.locator(".gpupool-usage")
    expect(panel.locator("svg.gpupool-chart rect.gpupool-bar")).to_have_count(30, timeout=WAIT_MS)
    expect(panel.locator(".gpupool-summary")).to_contain_text("GPU-hours")
    expect(panel.locator("tbody tr")).to_have_count(1)
    expect(panel.locator("tbody tr")).to_contain_text("H100 \u00d71")
    page.screenshot(path=str(SHOTS / "usage.png"))

    # The picker: the one-GPU kernel holds one of the two H100s, so two would queue.
    page.locator(".lm-TabBar-tabLabel", has_text="Untitled").first.click()
    page.locator('.lm-MenuBar-itemLabel:text("Kernel")').click()
    page.locator(".lm-Menu-itemLabel", has_text="Change Kernel to a GPU Shape").click()
    rows = page.locator(".gpupool-picker tbody tr")
    expect(rows).to_have_count(2, timeout=WAIT_MS)
    two = rows.filter(has_text="H100 \u00d72")
    expect(two).to_contain_text("160 GB")
    expect(two).to_contain_text("queued, position 1")
    expect(rows.filter(has_text="H100 \u00d71")).to_contain_text("starts now")
    page.screenshot(path=str(SHOTS / "picker.png"))
    # Refreshed while open: another kernel takes the last free H100, and the table says so.
    other = gateway(up, "POST", "/api/kernels", {"name": "python3-gpu-h100-x1"})
    one = rows.filter(has_text="H100 \u00d71")
    expect(one).to_contain_text("queued, position 1", timeout=WAIT_MS)
    gateway(up, "DELETE", f"/api/kernels/{other['id']}")
    expect(one).to_contain_text("starts now", timeout=WAIT_MS)
    two.click()
    page.locator(".jp-Dialog-button.jp-mod-accept").click()
    # Lab starts the new kernel, then shuts the old one down; the new one gets both GPUs.
    expect(status).to_contain_text("GPU H100 \u00d72", timeout=WAIT_MS)
    expect(status).to_contain_text(re.compile(r"· (idle|running) ·"), timeout=WAIT_MS)
    # It was queued behind the old one; a notification says when the GPUs are its.
    toast = page.locator(".Toastify__toast", has_text="H100 \u00d72 is yours")
    expect(toast).to_contain_text(re.compile(r"billing started at \$\d+\.\d\d/h"), timeout=WAIT_MS)
    expect(toast).to_be_visible()
    page.wait_for_timeout(1000)  # the toast slides in
    page.screenshot(path=str(SHOTS / "notification.png"))


def ran(cell: Any) -> None:
    """Wait until `cell` has run: its prompt shows an execution count."""
    expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=WAIT_MS)


@pytest.mark.timeout(300)
def test_idle_suspend_then_the_next_cell_resumes_with_its_variables(
    page: Page, up: dict[str, Any]
) -> None:
    """The notebook's two-H100 kernel of the test above, left idle. A reload of the page (as
    after a laptop's sleep) does not resume it: only the next cell does."""
    status = page.locator(".gpupool-status")
    expect(status).to_contain_text("GPU H100 \u00d72", timeout=WAIT_MS)
    ran(run_cell(page, "import threading; kept, held = 41, threading.Lock()"))
    expect(status).to_contain_text("suspended", timeout=(IDLE_S + 40) * 1000)
    toast = page.locator(".Toastify__toast", has_text="kernel is suspended")
    expect(toast).to_contain_text("idle for 20 s; billing stopped. Not saved: held. The next "
                                  "cell resumes it.", timeout=WAIT_MS)  # fmt: skip
    page.wait_for_timeout(1000)  # the toast slides in
    page.screenshot(path=str(SHOTS / "suspended.png"))
    page.reload()  # the tab's new websocket asks kernel_info, which the gateway answers
    expect(status).to_contain_text("suspended", timeout=WAIT_MS)
    page.wait_for_timeout(3000)  # time for a resume to show, were one started
    states = [k["gpupool"]["state"] for k in gateway(up, "GET", "/api/kernels")]
    assert states == ["suspended"], states
    expect(status).to_contain_text("suspended")
    cell = run_cell(page, "kept + 1")
    expect(cell.locator(RESULT)).to_contain_text("42", timeout=WAIT_MS)
    expect(status).to_contain_text(re.compile(r"· (idle|running) ·"), timeout=WAIT_MS)
    resumed = page.locator(".Toastify__toast", has_text="kernel resumed")
    expect(resumed).to_contain_text("Not restored: held.", timeout=WAIT_MS)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(SHOTS / "resumed.png"))


@pytest.mark.timeout(300)
def test_a_local_kernel_runs_beside_the_pool_kernel(page: Page) -> None:
    """A second tab on the user's own Python: no GPU there, no pool status; the GPU notebook's
    kernel still answers."""
    page.locator('.lm-MenuBar-itemLabel:text("File")').click()
    page.locator(".lm-Menu-itemLabel", has_text="New Launcher").click()
    page.locator(  # (the launcher the reload above restored may be open too, behind)
        '.jp-LauncherCard[data-category="Notebook"][title^="Python 3 (ipykernel)"]:visible'
    ).click()
    expect(page.locator(".jp-StatusBar-Widget").filter(has_text="Python 3 (ipykernel) | Idle")
           ).to_have_count(1, timeout=WAIT_MS)  # fmt: skip
    cell = run_cell(page, 'import os; print(os.environ.get("CUDA_VISIBLE_DEVICES"))')
    expect(cell.locator(".jp-OutputArea-output")).to_have_text("None", timeout=WAIT_MS)
    expect(page.locator(".gpupool-status")).to_be_hidden()  # a local kernel costs nothing
    page.screenshot(path=str(SHOTS / "local-beside-pool.png"))
    page.locator(".lm-TabBar-tabLabel", has_text=re.compile(r"^Untitled\.ipynb$")).click()
    cell = run_cell(page, "kept * 2")
    expect(cell.locator(RESULT)).to_contain_text("82", timeout=WAIT_MS)
    expect(page.locator(".gpupool-status")).to_contain_text("GPU H100 \u00d72")
