"""What the browser tests share: Debian's chromium (the module skips without it) launched as
Playwright's browser, and `gpupool up` with its Lab, started in a folder and stopped with Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import _read_lines, free_port

CHROMIUM = "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"needs Debian's chromium at {CHROMIUM} (`make install` installs it as root)",
                allow_module_level=True)  # fmt: skip

from playwright.sync_api import Browser, Page, Playwright, sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUILT = ROOT / "jupyter_ext" / "labextension"  # the front end `make install` builds


def launch(playwright: Playwright) -> Browser:
    """Headless, with no sandbox (root) and no background traffic (the network is closed)."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    )


@contextlib.contextmanager
def gpupool_up(folder: Path, mode: str = "hybrid", **env: str) -> Iterator[dict[str, Any]]:
    """`gpupool up` with Lab (as `make demo` runs it; `mode` "gateway" for stock gateway mode)
    in `folder`, two fake H100s, `env` added to a clean environment; yields its printed lines
    ("lab", "gateway", "token") and "log", its output file."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    # Its kernelspecs go to the folder's data, not the user's ~/.local (later Labs would show them).
    full_env.update(JUPYTER_RUNTIME_DIR=str(folder / "runtime"),
                    JUPYTER_DATA_DIR=str(folder / "data"), **env)  # fmt: skip
    log_path = folder / "up.log"
    command = [sys.executable, "-m", "gpupool.cli", "up", "--port", str(free_port()),
               "--host-port", str(free_port()), "--lab-port", str(free_port()),
               "--fake-gpus", "H100:2", "--lab-mode", mode]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, env=full_env, cwd=folder, start_new_session=True,
    )  # fmt: skip
    try:
        yield {**_read_lines(proc, log_path, ("lab", "gateway", "token")), "log": log_path}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def front_end_env(folder: Path) -> dict[str, str]:
    """This checkout's built front end and server extension where a Jupyter with this
    environment looks, and Lab's news question off (it would cover screenshots)."""
    data = folder / "data" / "labextensions" / "@gpupool"
    data.mkdir(parents=True)
    (data / "labextension").symlink_to(BUILT)
    config = folder / "config"
    (config / "jupyter_server_config.d").mkdir(parents=True)
    shipped = ROOT / "jupyter-config" / "server-config" / "gpupool.json"
    (config / "jupyter_server_config.d" / "gpupool.json").write_text(shipped.read_text())
    (config / "labconfig").mkdir()
    news = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    (config / "labconfig" / "page_config.json").write_text(json.dumps(news))
    return {"JUPYTER_PATH": str(folder / "data"), "JUPYTER_CONFIG_DIR": str(config)}


@contextlib.contextmanager
def lab_with_front_end(folder: Path, **env: str) -> Iterator[dict[str, Any]]:
    """`gpupool up` (hybrid) with this checkout's front end (`front_end_env`)."""
    with gpupool_up(folder, **front_end_env(folder), **env) as lines:
        yield lines


@contextlib.contextmanager
def tenant_lab(folder: Path, gateway_url: str, token: str) -> Iterator[str]:
    """Another tenant's own Lab beside local kernels (as on a laptop: GPUPOOL_URL and
    GPUPOOL_TOKEN) with this checkout's front end, its workspace `folder`; yields its URL with
    its Lab token."""
    from test_lab_extension import start_server

    env = front_end_env(folder)
    env.update(GPUPOOL_URL=gateway_url, GPUPOOL_TOKEN=token,
               JUPYTER_DATA_DIR=str(folder / "data"))  # fmt: skip
    server = start_server(folder, env=env)
    try:
        yield f"{server.url}/lab?token={server.token}"
    finally:
        server.stop()


def new_page(browser: Browser, width: int = 1400, height: int = 900) -> Page:
    """A page of that size. Playwright's 30 s per action is too short where 2 cores also run
    the other test workers: a click on the Settings Editor waited longer on a starved renderer."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(90_000)
    return page


def open_lab(browser: Browser, url: str) -> Page:
    """A page on Lab, its launcher shown."""
    page = new_page(browser)
    page.goto(url)
    page.wait_for_selector(".jp-LauncherCard", timeout=90_000)
    return page


@contextlib.contextmanager
def lab_page(url: str) -> Iterator[Page]:
    """Chromium on Lab at `url`, its launcher shown; closed after."""
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield open_lab(browser, url)
        finally:
            browser.close()


def gateway(up: dict[str, Any], method: str, path: str, body: Any = None) -> Any:
    """The gateway's REST API with the demo tenant's token (what another client would do)."""
    request = urllib.request.Request(
        up["gateway"] + path, method=method, headers={"Authorization": f"token {up['token']}"},
        data=None if body is None else json.dumps(body).encode(),
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:
        text = answer.read()
    return json.loads(text) if text else None


def gateway_kernels(up: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo tenant's kernels as the gateway lists them (every state but dead)."""
    return list(gateway(up, "GET", "/api/kernels"))


NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook shown


def run_cell(page: Page, code: str) -> Any:
    """Type `code` into the shown notebook's last cell and run it (Shift+Enter adds a new last
    cell); returns that cell."""
    cells = page.locator(f"{NOTEBOOK} .jp-Cell")
    cell = cells.nth(cells.count() - 1)
    cell.locator(".cm-content").click()
    page.keyboard.type(code)
    page.keyboard.press("Shift+Enter")
    return cell
