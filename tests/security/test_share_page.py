"""A shared notebook whose outputs are hostile: `<script>`, `<img onerror>`, `javascript:` links,
SVG with script, raw JavaScript outputs, a markdown cell doing the same. On the page none of it is
active markup, and the headers forbid script and sandbox the page whatever slips through."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import nbformat
import pytest
from conftest import Gateway, start_gateway
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

PWN = "document.title='pwned'"
HOSTILE_HTML = (
    f'<script>{PWN}</script><img src=x onerror="{PWN}">'
    '<a href="javascript:alert(1)">click</a><a href="JaVaScRiPt:alert(2)">also</a>'
    f'<iframe src="javascript:{PWN}"></iframe><form action="javascript:x"><button>b</button>'
    '</form><object data="x.swf"></object><meta http-equiv="refresh" content="0;url=/">'
    f'<div onmouseover="{PWN}">hover</div><style>@import url(http://evil.example/x.css)</style>'
)
HOSTILE_SVG = (
    "<svg xmlns='http://www.w3.org/2000/svg' onload=\"document.title='pwned'\">"
    "<script>document.title='pwned'</script><a href='javascript:alert(1)'><circle r='5'/></a>"
    "</svg>"
)


def hostile_notebook() -> dict[str, Any]:
    nb = new_notebook(
        cells=[
            new_markdown_cell(f"# Hi\n\n{HOSTILE_HTML}\n\n[link](javascript:alert(3))"),
            new_code_cell(
                "show()",
                outputs=[
                    new_output("display_data", data={"text/html": HOSTILE_HTML, "text/plain": "x"}),
                    new_output("display_data", data={"image/svg+xml": HOSTILE_SVG}),
                    new_output("display_data", data={"application/javascript": PWN}),
                    new_output("display_data", data={"text/markdown": "[m](javascript:alert(4))"}),
                    new_output(
                        "execute_result",
                        execution_count=1,
                        data={"text/html": "<script>fetch('/api/shares')</script>"},
                    ),
                ],
            ),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    return json.loads(nbformat.writes(nb))


class ActiveMarkup(HTMLParser):
    """Every element, event handler and URL attribute that would act in a browser."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "iframe", "object", "embed", "form", "meta", "base", "link"):
            if not (tag == "meta" and all(k in ("charset", "name", "content") for k, _ in attrs)):
                self.found.append(f"<{tag} {attrs}>")
        for name, value in attrs:
            if name.startswith("on"):
                self.found.append(f"<{tag} {name}=...>")
            scheme = re.sub(r"[\s\x00-\x1f]", "", value or "").lower()
            if name in ("href", "src", "action", "formaction", "xlink:href", "data") and (
                scheme.startswith(("javascript:", "vbscript:", "data:text/html"))
            ):
                self.found.append(f"<{tag} {name}={value}>")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("share-page"))
    gateway.token = gateway.tenant("alice")
    yield gateway
    gateway.stop()


def test_hostile_outputs_are_inert_and_the_headers_forbid_script(gw: Gateway) -> None:
    made = gw.call("POST", "/api/shares", {"notebook": hostile_notebook(), "access": "anyone"})
    assert made.status == 201, made.body
    page = gw.call("GET", made.body["path"], token="")
    assert page.status == 200
    html = page.body
    assert isinstance(html, str) and "Hi" in html
    parser = ActiveMarkup()
    parser.feed(html)
    assert parser.found == []
    at = html.lower().find("<script")
    assert at < 0, html[at - 300 : at + 200]
    csp = {d.split()[0]: d for d in page.headers["Content-Security-Policy"].split("; ")}
    assert csp["default-src"] == "default-src 'none'"
    assert "script-src" not in csp  # so default-src 'none' forbids every script
    assert csp["sandbox"] == "sandbox"  # no allow-scripts, no allow-same-origin
    assert csp["frame-ancestors"] == "frame-ancestors 'none'"
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert "Set-Cookie" not in page.headers


def test_the_not_found_page_has_the_same_headers(gw: Gateway) -> None:
    page = gw.call("GET", "/s/" + "x" * 32, token="")
    assert page.status == 404
    assert "sandbox" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"


def test_share_ids_are_unguessable(gw: Gateway) -> None:
    ids = [
        gw.call("POST", "/api/shares", {"notebook": hostile_notebook()}).body["id"]
        for _ in range(20)
    ]
    assert len(set(ids)) == 20
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", i) for i in ids)  # 24 random bytes each
