"""The read-only page of a shared notebook: nbconvert's HTML with `sanitize_html`, served under a
Content-Security-Policy that runs no script at all and sandboxes the page into an opaque origin,
so whatever HTML or JavaScript the outputs hold cannot act on the gateway or read its tokens."""

from __future__ import annotations

import re
from html import escape
from typing import Any

import bleach
import nbformat
from nbconvert import HTMLExporter

from gpupool.wire import iso

from .store import Share

# No script, no plugin, no form, no framing, nothing fetched but inline styles and data: images;
# `sandbox` (no allow-* token) gives the page an opaque origin even if a script slipped through.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; sandbox"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "private, no-store",  # revoking a link must take effect at once
}
# What the template itself adds (require.js, MathJax, mermaid from a CDN): the CSP blocks them
# anyway, and without them the page holds no <script> at all. Sanitized outputs hold none: their
# markup is escaped or removed before this runs.
TEMPLATE_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script\s*>", re.S | re.I)
BODY_OPEN = re.compile(r"<body\b[^>]*>", re.I)

STYLE = """
.gpupool-share { font: 14px/1.45 system-ui, sans-serif; margin: 16px auto; max-width: 1100px;
  border: 1px solid #d0d7de; border-radius: 6px; padding: 12px 16px; background: #f6f8fa; }
.gpupool-share h1 { font-size: 18px; margin: 0 0 6px; }
.gpupool-share dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px;
  margin: 6px 0; }
.gpupool-share dt { color: #57606a; }
.gpupool-share dd { margin: 0; }
.gpupool-share details { margin-top: 6px; }
.gpupool-share table { border-collapse: collapse; font-size: 12px; }
.gpupool-share td { padding: 0 12px 0 0; font-family: ui-monospace, monospace; }
.gpupool-open { display: inline-block; margin-top: 8px; padding: 5px 12px; border-radius: 6px;
  background: #1f6feb; color: #fff; text-decoration: none; font-weight: 600; }
#open-in-jupyterlab { display: none; margin-top: 8px; }
#open-in-jupyterlab:target { display: block; }
.gpupool-share code { background: #fff; border: 1px solid #d0d7de; padding: 1px 4px;
  user-select: all; }
"""


# nbconvert's own clean_html keeps too few tags (headings and table headers come out as escaped
# text); this allowlist adds only inert structure. No style attribute, no form, no frame.
SAFE_TAGS = sorted({
    *bleach.ALLOWED_TAGS, "h1", "h2", "h3", "h4", "h5", "h6", "p", "br", "hr", "div", "span",
    "pre", "code", "kbd", "samp", "sup", "sub", "del", "ins", "s", "u", "small", "mark", "img",
    "table", "caption", "thead", "tbody", "tfoot", "tr", "th", "td", "dl", "dt", "dd",
    "details", "summary", "figure", "figcaption",
})  # fmt: skip
SAFE_SCHEMES = ["http", "https", "mailto", "data"]
DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]*$")
SAFE_ATTRIBUTES = {
    "*": {"class", "id", "title"},
    "a": {"href", "title"},
    "img": {"src", "alt", "width", "height"},
    "td": {"colspan", "rowspan", "align"},
    "th": {"colspan", "rowspan", "align", "scope"},
}


def _attribute_allowed(tag: str, name: str, value: str) -> bool:
    if name not in SAFE_ATTRIBUTES["*"] | SAFE_ATTRIBUTES.get(tag, set()):
        return False
    if name == "src":  # images inline only: nothing is fetched (the CSP says so too)
        return bool(DATA_IMAGE.match(value.strip()))
    if name == "href":  # no data:text/html; javascript: is not among SAFE_SCHEMES
        return not value.strip().lower().startswith("data:")
    return True


def clean_html(element: Any) -> str:
    """HTML from outputs and markdown, with only inert tags, attributes and URL schemes left."""
    text = element.decode() if isinstance(element, bytes) else str(element)
    return str(
        bleach.clean(text, tags=SAFE_TAGS, attributes=_attribute_allowed, protocols=SAFE_SCHEMES)
    )


def render_notebook(snapshot: bytes) -> str:
    """The snapshot as a full HTML document (sanitized outputs, no script elements)."""
    notebook = nbformat.reads(snapshot.decode(), as_version=4)
    exporter = HTMLExporter(
        template_name="lab", sanitize_html=True, filters={"clean_html": clean_html}
    )
    html, _resources = exporter.from_notebook_node(notebook)
    return TEMPLATE_SCRIPT.sub("", html)


def shape_text(share: Share) -> str:
    if not share.gpu_count:
        return "CPU"
    return f"{share.gpu_type} ×{share.gpu_count}"  # noqa: RUF001


def header(share: Share, shared_by: str, link: str) -> str:
    """The box above the notebook: what it is, who shared it and when, what it ran with."""
    environment: dict[str, Any] = share.environment or {}
    packages: dict[str, str] = environment.get("packages") or {}
    rows = [
        ("Kernel", f"{shape_text(share)} ({share.kernel_name})"),
        ("Python", environment.get("python") or "not recorded"),
        ("Shared by", shared_by),
        ("Shared at", iso(share.created)[:19].replace("T", " ") + " UTC"),
        ("Outputs", "as the sharer ran it" if share.outputs else "stripped by the sharer"),
    ]
    if share.expires is not None:
        rows.append(("Expires", iso(share.expires)[:19].replace("T", " ") + " UTC"))
    listing = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    if packages:
        table = "".join(
            f"<tr><td>{escape(name)}</td><td>{escape(version)}</td></tr>"
            for name, version in packages.items()
        )
        packages_html = (
            f"<details><summary>{len(packages)} packages in the sharer's kernel</summary>"
            f"<table>{table}</table></details>"
        )
    else:
        packages_html = "<p>Packages: not recorded (the sharer's client did not ask a kernel).</p>"
    action = ""
    if share.mode == "run":
        action = (
            f'<a class="gpupool-open" href="#open-in-jupyterlab" data-gpupool-share="{share.id}">'
            "Open in JupyterLab</a>"
            '<div id="open-in-jupyterlab">Run your own copy, on your own kernel of the same '
            "shape, billed to you: in JupyterLab with the gpupool extension, run "
            "<b>Open shared notebook…</b> (File menu or command palette) and paste "
            f"<code>{escape(link)}</code>; or on the command line "
            f"<code>gpupool share copy {share.id}</code>.</div>"
        )
    return (
        f'<section class="gpupool-share" data-gpupool-share="{share.id}" '
        f'data-gpupool-mode="{share.mode}"><h1>{escape(share.name)} (read-only)</h1>'
        f"<dl>{listing}</dl>{packages_html}{action}</section>"
    )


def page(rendered: str, share: Share, shared_by: str, link: str) -> str:
    """`rendered` (render_notebook's) with the share's box at the top of its body."""
    box = f"<style>{STYLE}</style>{header(share, shared_by, link)}"
    match = BODY_OPEN.search(rendered)
    at = match.end() if match else 0
    return rendered[:at] + box + rendered[at:]


NOT_FOUND_PAGE = (
    "<!doctype html><meta charset='utf-8'><title>No shared notebook here</title>"
    "<p style='font: 15px system-ui, sans-serif; margin: 2em'>No shared notebook here: the link "
    "may be mistyped, revoked or expired, or shared only with signed-in tenants (their clients "
    "send the tenant token in the <code>Authorization</code> header).</p>"
)
