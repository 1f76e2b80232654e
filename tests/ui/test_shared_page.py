"""The shared notebook page in a real browser (Debian's chromium): a notebook whose outputs try to
run script (set document.title, fetch the gateway's API, read cookies) does not run it there, and
the page's origin is opaque, so even a script injected afterwards could not reach the gateway.
Takes the screenshot docs/screenshots/shared-page.png of a `run` link."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from conftest import Gateway, start_gateway
from lab_stack import ROOT, launch, new_page
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.slow

SHOTS = ROOT / "docs" / "screenshots"
STEAL = (
    "document.title='pwned';"
    "fetch('/api/shares',{headers:{Authorization:'token '+document.cookie}})"
    ".then(()=>{document.title='fetched'});"
)
TABLE = (
    "<table><thead><tr><th>epoch</th><th>loss</th><th>accuracy</th></tr></thead><tbody>"
    + "".join(
        f"<tr><td>{e}</td><td>{1 / (e + 1):.3f}</td><td>{0.7 + 0.05 * e:.2f}</td></tr>"
        for e in range(5)
    )
    + "</tbody></table>"
)
CHART = (
    "<svg xmlns='http://www.w3.org/2000/svg' width='320' height='120'>"
    "<polyline fill='none' stroke='#1f6feb' stroke-width='3' "
    "points='10,20 80,60 150,85 220,97 300,102'/></svg>"
)


def shared_notebook() -> dict[str, object]:
    nb = new_notebook(
        cells=[
            new_markdown_cell("# Fine-tuning on one H100\n\nLoss and accuracy per epoch."),
            new_code_cell(
                "history = train(model, epochs=5)\nhistory",
                execution_count=1,
                outputs=[
                    new_output("execute_result", execution_count=1,
                               data={"text/html": TABLE, "text/plain": "history"}),
                    new_output("display_data", data={"image/svg+xml": CHART}),
                    new_output("display_data", data={
                        "text/html": f"<script>{STEAL}</script>"
                                     f"<img src=x onerror=\"{STEAL}\">"
                                     "<a href=\"javascript:document.title='pwned'\">details</a>",
                        "text/plain": "<report>"}),
                    new_output("display_data", data={"application/javascript": STEAL}),
                ],
            ),
        ],
        metadata={"kernelspec": {"name": "python3-gpu-h100-x1", "display_name": "H100",
                                 "language": "python"}},
    )  # fmt: skip
    return json.loads(nbformat.writes(nb))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("shared-page"))
    gateway.token = gateway.tenant("alice")
    yield gateway
    gateway.stop()


def test_a_script_output_does_not_run_and_cannot_reach_the_gateway(gw: Gateway) -> None:
    made = gw.call("POST", "/api/shares", {
        "notebook": shared_notebook(), "name": "fine-tune.ipynb", "mode": "run",
        "access": "anyone",
        "environment": {"python": "3.12.3", "packages": {
            "numpy": "2.1.3", "torch": "2.5.1", "transformers": "4.46.3"}},
    })  # fmt: skip
    assert made.status == 201, made.body
    url = gw.url + made.body["path"]
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = new_page(browser, 1100, 760)
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url, wait_until="load")
            page.get_by_text("Loss and accuracy per epoch").wait_for()
            title = page.title()
            assert "pwned" not in title and "fetched" not in title
            assert requests == [url]  # no fetch, no image, no script from the page
            # The page's origin is opaque (CSP sandbox): nothing there can read the gateway's.
            assert page.evaluate("() => window.origin") == "null"
            assert page.evaluate(
                "() => { try { return document.cookie } catch (e) { return e.name } }"
            ) == "SecurityError"  # fmt: skip
            # A script added to the page after it loaded does not run either (script-free CSP).
            page.evaluate(
                "() => { const s = document.createElement('script');"
                " s.textContent = \"document.title = 'pwned'\"; document.body.append(s); }"
            )
            page.get_by_text("details").click()  # the javascript: link, made inert
            assert "pwned" not in page.title()
            assert requests == [url]
            page.get_by_text("Open in JupyterLab").click()
            page.get_by_text("Open shared notebook…").wait_for()
            assert page.locator("th", has_text="accuracy").count() == 1  # tables are kept
            page.evaluate("() => window.scrollTo(0, 0)")
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "shared-page.png"))
            assert "pwned" not in page.title()
        finally:
            browser.close()


def test_a_link_for_tenants_only_shows_the_same_not_found_page(gw: Gateway, tmp_path: Path) -> None:
    made = gw.call("POST", "/api/shares", {"notebook": shared_notebook(), "access": "gateway"})
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = new_page(browser)
            answer = page.goto(gw.url + made.body["path"])
            assert answer is not None and answer.status == 404
            assert "No shared notebook here" in page.content()
            # A tenant's client that sends the token in the header sees it.
            page.set_extra_http_headers({"Authorization": f"token {gw.token}"})
            answer = page.goto(gw.url + made.body["path"])
            assert answer is not None and answer.status == 200
        finally:
            browser.close()
