"""Shared notebook page benchmark: `GET /s/{id}` of a 5 MB notebook, rendered once per snapshot
and cached, against rendering it with nbconvert on every request.

Run from the repository root:

    .venv/bin/python bench/share.py [--requests N] [--renders M] [--mb 5]

One `gpupool gateway` is started in a scratch folder with a tenant; a notebook of about `--mb` MB
(markdown, code, HTML tables, inline PNG images and text outputs, as a real report has) is shared
with `access: anyone`. Then:

- the first GET, which renders the snapshot (nbconvert, sanitize_html) and fills the cache;
- `--requests` GETs of the same link over one keep-alive connection: the cached page;
- the baseline, `--renders` times: what an uncached gateway would do per request, the same
  `render_notebook` and `page` calls in this process (no HTTP at all, so it flatters the baseline).

Target: the cached GET's median under 100 ms.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat
from harness import REPO, commit, describe_machine, log, run_main
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

sys.path.insert(0, str(REPO))
from kernel_gateway.share_page import page, render_notebook
from kernel_gateway.store import Share


def png(width: int, height: int) -> bytes:
    """A real PNG of noise (incompressible, as plots' antialiasing mostly is)."""
    rows = b"".join(b"\0" + os.urandom(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\0\0\0"
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))  # fmt: skip


def report_notebook(megabytes: float) -> dict[str, Any]:
    """Sections of markdown, code, a table, a plot and a log, until about `megabytes` MB."""
    cells: list[Any] = []
    size, section = 0, 0
    while size < megabytes * 1e6:
        section += 1
        table = "<table><thead><tr><th>step</th><th>loss</th><th>lr</th></tr></thead><tbody>"
        table += "".join(f"<tr><td>{i}</td><td>{1 / (i + 1):.4f}</td><td>{3e-4:.1e}</td></tr>"
                         for i in range(40)) + "</tbody></table>"  # fmt: skip
        image = base64.b64encode(png(120, 80)).decode()
        logtext = "".join(f"step {i}: loss {1 / (i + 1):.5f}\n" for i in range(200))
        cells += [
            new_markdown_cell(f"## Section {section}\n\nResults of run *{section}*, with a table."),
            new_code_cell(
                f"result = train(section={section})\nresult.table()",
                execution_count=section,
                outputs=[
                    new_output("execute_result", execution_count=section,
                               data={"text/html": table, "text/plain": "table"}),
                    new_output("display_data", data={"image/png": image, "text/plain": "plot"}),
                    new_output("stream", name="stdout", text=logtext),
                ],
            ),
        ]  # fmt: skip
        size += len(table) + len(image) + len(logtext) + 200
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3-gpu-h100-x1",
                                                            "display_name": "H100"}})  # fmt: skip
    return json.loads(nbformat.writes(nb))


class Gateway:
    def __init__(self, where: Path) -> None:
        self.log_path = where / "gateway.log"
        port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool.cli", "gateway", "--port", str(port),
             "--state-dir", str(where / "state")],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, cwd=where,
            env={k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")},
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while "gateway: " not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start: {self.log_path.read_text()}")
            time.sleep(0.1)
        admin = (where / "state" / "admin-token").read_text().strip()
        self.token = self.call("POST", "/api/admin/tenants", {"name": "bench"}, admin)["token"]

    def call(self, method: str, path: str, body: Any, token: str) -> Any:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method=method,
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    async def cleanup(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def logs(self) -> list[tuple[str, Any]]:
        return [("the gateway", self.log_path.read_text)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def row(name: str, times: list[float], base: float) -> str:
    ms = sorted(t * 1000 for t in times)
    median = statistics.median(ms)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"| {name} | {len(ms)} | {median:.1f} ms | {p90:.1f} ms | {median / base:.3f}x |"


async def body(gw: Gateway, requests: int, renders: int, megabytes: float) -> None:
    notebook = report_notebook(megabytes)
    log(f"sharing a notebook of {len(json.dumps(notebook)) / 1e6:.1f} MB")
    made = gw.call("POST", "/api/shares", {"notebook": notebook, "access": "anyone",
                                           "name": "report.ipynb"}, gw.token)  # fmt: skip
    host, port = gw.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=300)

    def get() -> tuple[float, int]:
        started = time.perf_counter()
        connection.request("GET", made["path"])
        response = connection.getresponse()
        data = response.read()
        assert response.status == 200, data[:300]
        return time.perf_counter() - started, len(data)

    first, page_bytes = get()
    log(f"first GET (renders and caches): {first * 1000:.0f} ms, page {page_bytes / 1e6:.1f} MB")
    cached = [get()[0] for _ in range(requests)]
    connection.close()

    snapshot = nbformat.writes(nbformat.from_dict(notebook)).encode()
    share = Share(id=made["id"], name="report.ipynb", mode="view", outputs=True,
                  kernel_name="python3-gpu-h100-x1", gpu_type="H100", gpu_count=1,
                  environment=None, created=time.time(), expires=None)  # fmt: skip
    uncached = []
    for _ in range(renders):
        started = time.perf_counter()
        page(render_notebook(snapshot), share, "bench", gw.url + made["path"])
        uncached.append(time.perf_counter() - started)

    base = statistics.median(uncached) * 1000
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {describe_machine(['nbconvert', 'tornado', 'bleach'], gpus='none used')}")
    print(f"commit: {commit(['kernel_gateway', 'bench/share.py'])}; date: "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")  # fmt: skip
    print(f"notebook: {made['size'] / 1e6:.1f} MB snapshot; page {page_bytes / 1e6:.1f} MB\n")
    print("| GET /s/{id} | n | median | p90 | vs nbconvert every request |")
    print("|---|---|---|---|---|")
    print(row("nbconvert on every request (baseline, no HTTP)", uncached, base))
    print(row("first GET: render and cache", [first], base))
    print(row("cached page (gateway, HTTP keep-alive)", cached, base))
    median = statistics.median(cached) * 1000
    print(f"\ncached median {median:.1f} ms; target < 100 ms: "
          f"{'met' if median < 100 else 'NOT met'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--renders", type=int, default=5)
    parser.add_argument("--mb", type=float, default=5.0)
    args = parser.parse_args()
    run_main("gpupool-bench-share-", Gateway,
             lambda g: body(g, args.requests, args.renders, args.mb), "the gateway")  # fmt: skip


if __name__ == "__main__":
    main()
