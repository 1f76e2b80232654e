"""The pool kernel's status bar and details in a real browser, in the Lab of `gpupool up`: the
status bar shows the GPU's utilization and memory, its details the host and when the GPU was
taken (screenshot docs/screenshots/status-details.png), and closing the kernel's last tab asks
whether to keep it running or shut it down; shut down, it is gone from the gateway.
Uses Debian's chromium; skips without it, or without the built front end."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab_stack import BUILT, gateway_kernels, lab_page, lab_with_front_end

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
if not (BUILT / "package.json").exists():
    pytest.skip("the Lab front end is not built; `make install` builds it", allow_module_level=True)

from playwright.sync_api import Page, expect  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_MS = 60_000
NOTEBOOK_TAB = ".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with lab_with_front_end(tmp_path_factory.mktemp("details")) as lines:
        yield lines


@pytest.fixture(scope="module")
def page(up: dict[str, Any]) -> Iterator[Page]:
    with lab_page(up["lab"]) as page:
        yield page


@pytest.mark.timeout(300)
def test_status_bar_details_and_closing_the_last_tab(page: Page, up: dict[str, Any]) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    card = page.locator('.jp-LauncherCard[data-category="GPU pool"]').filter(
        has_text="H100 \u00d71"
    )
    expect(card).to_have_count(1, timeout=WAIT_MS)
    card.click()
    status = page.locator(".gpupool-status")
    # The fake H100 reports itself idle and empty: 0 % busy, 0.0 of its 80 GB used.
    expect(status).to_contain_text(
        re.compile(r"GPU H100 \u00d71 · (idle|running) · 0% · 0\.0/80 GB · \$\d+\.\d{4} · "
                   r"suspends in \d+:\d\d"),
        timeout=WAIT_MS,
    )  # fmt: skip
    [kernel] = gateway_kernels(up)
    held = kernel["gpupool"]

    status.click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Host", timeout=WAIT_MS)
    cells = [c.strip() for c in dialog.locator("td").all_inner_texts()]
    rows = dict(zip(cells[0::2], cells[1::2], strict=True))
    assert rows["Host"] == held["host"], rows
    assert re.search(r"\d", rows["Started"]) and "Z" not in rows["Started"], rows  # local time
    assert rows["GPU 0"] == f"{held['gpus'][0]['uuid']} · 0% · 0.0/80 GB", rows
    assert {"Billed", "Cost so far", "Idle timeout"} <= set(rows), rows
    expect(dialog.get_by_role("button", name="Release GPU (shut down)")).to_be_visible()
    page.screenshot(path=str(SHOTS / "status-details.png"))
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_have_count(0)

    # Closing the tab asks first; Cancel keeps the tab and the kernel.
    close_icon = page.locator(f"{NOTEBOOK_TAB} .lm-TabBar-tabCloseIcon")
    close_icon.click()
    prompt = page.locator(".jp-Dialog", has_text="billed until it idles")
    expect(prompt).to_contain_text(re.compile(r"about \d+ min|under a minute"), timeout=WAIT_MS)
    expect(prompt.get_by_role("button", name="Keep H100 \u00d71 running")).to_be_visible()
    prompt.get_by_role("button", name="Cancel").click()
    expect(prompt).to_have_count(0)
    expect(page.locator(NOTEBOOK_TAB, has_text=".ipynb")).to_have_count(1)
    assert [k["id"] for k in gateway_kernels(up)] == [kernel["id"]]

    close_icon.click()
    prompt.get_by_role("button", name="Shut it down").click(timeout=WAIT_MS)
    discard = page.locator(".jp-Dialog").get_by_role("button", name="Discard")
    try:  # a notebook with unsaved changes is asked about next, as Lab always does
        discard.click(timeout=3_000)
    except Exception:
        pass
    expect(page.locator(".lm-TabBar-tab", has_text=".ipynb")).to_have_count(0, timeout=WAIT_MS)
    deadline = time.monotonic() + 60
    while gateway_kernels(up) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gateway_kernels(up) == [], "the kernel shut down with its last tab"
