"""The GPU pool settings, changed in Lab's own Settings Editor in a real browser, reach what
they name: "Show cost" off takes the prices out of the launcher, "Default GPU shape" puts its
card first and becomes `%%gpu`'s shape in a local Python kernel, and "Idle timeout" becomes the
idle timeout of a pool kernel started afterwards (at the gateway) and of `%%gpu`'s GPU kernels.
Uses Debian's chromium; skips without it, or without the built front end."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab_stack import BUILT, gateway_kernels, lab_page, lab_with_front_end, run_cell

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
if not (BUILT / "package.json").exists():
    pytest.skip("the Lab front end is not built; `make install` builds it", allow_module_level=True)

from playwright.sync_api import Page, expect  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_MS = 60_000
POOL_CARDS = '.jp-LauncherCard[data-category="GPU pool"]'


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with lab_with_front_end(tmp_path_factory.mktemp("settings")) as lines:
        yield lines


@pytest.fixture(scope="module")
def page(up: dict[str, Any]) -> Iterator[Page]:
    with lab_page(up["lab"]) as page:
        yield page


def new_launcher(page: Page) -> None:
    page.locator('.lm-MenuBar-itemLabel:text("File")').click()
    page.locator(".lm-Menu-itemLabel", has_text="New Launcher").click()


@pytest.mark.timeout(300)
def test_settings_from_the_settings_editor_reach_launcher_and_kernels(
    page: Page, up: dict[str, Any]
) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    expect(page.locator(POOL_CARDS).first).to_contain_text("$", timeout=WAIT_MS)

    page.locator('.lm-MenuBar-itemLabel:text("Settings")').click()
    page.locator(".lm-Menu-itemLabel", has_text="Settings Editor").click()
    page.locator(".jp-PluginList-entry", has_text="GPU pool").first.click()
    field = 'input[id="jp-SettingsEditor-@gpupool/labextension:plugin_{}"]'.format
    page.locator(field("defaultShape")).fill("H100:2")
    page.locator(field("idleTimeout")).fill("300")
    page.locator(field("showCost")).uncheck()
    page.locator(field("defaultShape")).click()  # the last field's change is taken on blur
    page.screenshot(path=str(SHOTS / "settings.png"))

    # The launcher follows at once: no prices, the default shape's card first.
    page.locator(".lm-TabBar-tabLabel", has_text="Launcher").click()
    first = page.locator(POOL_CARDS).first
    expect(first).to_contain_text("H100 \u00d72", timeout=WAIT_MS)
    expect(first).to_contain_text("(default)")
    expect(page.locator(POOL_CARDS).filter(has_text="$")).to_have_count(0)
    expect(page.locator(f'{POOL_CARDS}[title*="$"]')).to_have_count(0)

    # A pool kernel started now has the idle timeout at the gateway.
    before = {kernel["id"] for kernel in gateway_kernels(up)}
    page.locator(POOL_CARDS).filter(has_text="H100 \u00d71").click()
    expect(page.locator(".gpupool-status")).to_contain_text("GPU H100 \u00d71", timeout=WAIT_MS)
    expect(page.locator(".gpupool-status")).not_to_contain_text("$")  # show cost: off
    deadline = time.monotonic() + 30
    started: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not started:
        started = [k for k in gateway_kernels(up) if k["id"] not in before]
        time.sleep(0.2)
    assert len(started) == 1, started
    assert started[0]["gpupool"]["idle_timeout"] == 300, started[0]["gpupool"]

    # A local Python kernel's %%gpu takes the default shape and the idle timeout.
    new_launcher(page)
    page.locator(
        '.jp-LauncherCard[data-category="Notebook"][title^="Python 3 (ipykernel)"]'
    ).click()
    expect(page.locator(".jp-StatusBar-Widget").filter(has_text="Python 3 (ipykernel) | Idle")
           ).to_have_count(1, timeout=WAIT_MS)  # fmt: skip
    cell = run_cell(page, "%gpu default")
    expect(cell.locator(".jp-OutputArea-output")).to_have_text(
        re.compile(r"run on H100 \u00d72; GPU kernels started from now suspend after 300 s idle"),
        timeout=WAIT_MS,
    )
