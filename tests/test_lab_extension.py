"""The Lab extension's server side: the /gpupool/ routes of a real jupyter_server against the
embedded stack (403 without Lab's auth, bad input, gateway outage and a wrong token as one clear
JSON error, the token never in an answer or the log), and the wheel's packaging: after installing
it, `jupyter labextension list` and `jupyter server extension list` show both enabled, and the
IPython kernel config that loads `%%gpu` in local kernels is in place."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LabServer:
    proc: subprocess.Popen[str]
    url: str
    token: str
    log_path: Path

    def get(self, path: str, auth: bool = True, body: bytes | None = None) -> tuple[int, str]:
        return self.send("GET", path, body, auth)

    def send(
        self, method: str, path: str, body: bytes | None = None, auth: bool = True
    ) -> tuple[int, str]:
        """The status and text of any request, errors included."""
        headers = {"Authorization": f"token {self.token}"} if auth else {}
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": f"token {self.token}"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def delete(self, path: str) -> None:
        request = urllib.request.Request(
            self.url + path, method="DELETE", headers={"Authorization": f"token {self.token}"}
        )
        urllib.request.urlopen(request, timeout=60).close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_server(folder: Path, *args: str, env: dict[str, str] | None = None) -> LabServer:
    """A jupyter_server with only our server extension enabled (by the file the wheel ships)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config"
    (config / "jupyter_server_config.d").mkdir(parents=True, exist_ok=True)
    shipped = ROOT / "jupyter-config" / "server-config" / "gpupool.json"
    (config / "jupyter_server_config.d" / "gpupool.json").write_text(shipped.read_text())
    port, token = free_port(), uuid.uuid4().hex
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    full_env["JUPYTER_DATA_DIR"] = str(folder / "data")  # its kernelspecs: never the user's own
    full_env.update(env or {})
    full_env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_RUNTIME_DIR=str(folder / "runtime"),
                    JUPYTER_TOKEN=token)  # fmt: skip
    log_path = folder / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
         "--ip=127.0.0.1", "--allow-root", *args],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, text=True, env=full_env,
        cwd=folder,
    )  # fmt: skip
    server = LabServer(proc, f"http://127.0.0.1:{port}", token, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if server.get("/api/status")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"jupyter_server did not start: {log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def lab(stack: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """Gateway mode, as `gpupool up` runs Lab: the routes use the server's own gateway config."""
    server = start_server(
        tmp_path_factory.mktemp("lab"), f"--gateway-url={stack.url}",
        env={"JUPYTER_GATEWAY_AUTH_TOKEN": stack.token},
    )  # fmt: skip
    yield server
    server.stop()
    assert stack.token not in server.log_path.read_text()


def test_every_route_needs_labs_auth(lab: LabServer) -> None:
    for path in ("/gpupool/shapes", "/gpupool/usage", f"/gpupool/kernels/{uuid.uuid4()}",
                 f"/gpupool/companions/{uuid.uuid4()}", "/gpupool/preferences"):  # fmt: skip
        status, _ = lab.get(path, auth=False)
        assert status == 403, path


def test_shapes_show_type_count_memory_price_free_and_queue(lab: LabServer, stack: Gateway) -> None:
    status, text = lab.get("/gpupool/shapes")
    assert status == 200, text
    assert stack.token not in text
    shapes = {s["name"]: s for s in json.loads(text)["shapes"]}
    h100 = shapes["python3-gpu-h100-x1"]
    assert (h100["gpu_type"], h100["gpu_count"], h100["free"], h100["queue"]) == ("H100", 1, 2, 0)
    assert h100["memory_gb"] == 80 and h100["usd_per_hour"] > 0
    assert h100["kernel_name"] == "python3-gpu-h100-x1"  # Lab knows it by the same name


def test_bad_input_is_refused(lab: LabServer) -> None:
    assert lab.get("/gpupool/kernels/not-a-kernel")[0] == 400
    assert lab.get("/gpupool/companions/NOT-A-KERNEL")[0] == 400
    assert lab.get("/gpupool/companions/" + "a" * 5000)[0] == 400
    assert lab.get("/gpupool/kernels/..%2F..%2Fapi%2Fusage")[0] in (400, 404)
    status, text = lab.get("/gpupool/shapes", body=b'{"x": 1}')
    assert status == 400, text
    status, text = lab.get(f"/gpupool/kernels/{uuid.uuid4()}")
    assert status == 404 and "message" in json.loads(text)


def test_a_running_gpu_kernel_and_usage(lab: LabServer, stack: Gateway) -> None:
    kernel = lab.post("/api/kernels", {"name": "python3-gpu-h100-x1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            status, text = lab.get(f"/gpupool/kernels/{kernel['id']}")
            assert status == 200, text
            info = json.loads(text)
            if info["gpupool"]["state"] == "running" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert stack.token not in text
        gpupool = info["gpupool"]
        assert (gpupool["state"], gpupool["gpu_type"], gpupool["gpu_count"]) == (
            "running",
            "H100",
            1,
        )
        assert gpupool["idle_seconds_left"] > 0 and gpupool["cost_usd"] >= 0
        # The status bar's details: the gateway's host, start and GPU readings pass through.
        assert gpupool["host"] and gpupool["started"].endswith("Z")
        [gpu] = gpupool["gpus"]
        assert (gpu["utilization"], gpu["memory_used"], gpu["memory_total"]) == (0, 0, 80 << 30)
        time.sleep(1)
        status, text = lab.get("/gpupool/usage")
        assert status == 200, text
        usage = json.loads(text)
        assert len(usage["days"]) == 30 and usage["total_gpu_hours"] > 0
        assert [k["kernel_id"] for k in usage["kernels"]] == [kernel["id"]]
        assert usage["kernels"][0]["open"] and usage["budget"]["budget_usd"] is None
        assert stack.token not in text
    finally:
        lab.delete(f"/api/kernels/{kernel['id']}")


@pytest.mark.parametrize("case", ["unreachable", "wrong token", "not configured"])
def test_gateway_trouble_is_one_clear_json_error(case: str, stack: Gateway, tmp_path: Path) -> None:
    wrong = "w" * 64
    env = {
        "unreachable": {"GPUPOOL_URL": f"http://127.0.0.1:{free_port()}", "GPUPOOL_TOKEN": wrong},
        "wrong token": {"GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": wrong},
        "not configured": {},
    }[case]
    server = start_server(tmp_path, env=env)
    try:
        status, text = server.get("/gpupool/shapes")
        assert status == {"unreachable": 502, "wrong token": 502, "not configured": 503}[case]
        error = json.loads(text)
        assert error["reason"] == {"unreachable": "gateway unreachable",
                                   "wrong token": "token refused",
                                   "not configured": "not configured"}[case]  # fmt: skip
        assert "GPUPOOL_TOKEN" in error["message"] or case == "unreachable"
        assert wrong not in text
        # Local kernels are untouched.
        assert server.get("/api/kernelspecs")[0] == 200
    finally:
        server.stop()
    assert wrong not in server.log_path.read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_installs_both_extensions_enabled(tmp_path: Path) -> None:
    """Built as the release is (hatch-jupyter-builder, the prebuilt front end as shared-data),
    installed without dependencies into a prefix that Jupyter is pointed at."""
    if not (ROOT / "jupyter_ext" / "labextension" / "package.json").exists():
        pytest.skip("the Lab front end is not built; `make install` builds it")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, timeout=240)  # fmt: skip
    wheel = next((tmp_path / "dist").glob("gpupool-*.whl"))
    prefix = tmp_path / "prefix"
    # --ignore-installed: else pip would first uninstall the gpupool of this venv.
    subprocess.run([*pip, "install", "--no-deps", "--ignore-installed", "-q", "--prefix",
                    str(prefix), str(wheel)], check=True, timeout=120)  # fmt: skip
    site = next(prefix.glob("lib/python3*/site-packages"))
    # IPython reads sys.prefix/etc/ipython: every ipykernel of the environment loads %%gpu.
    kernel_config = json.loads(
        (prefix / "etc" / "ipython" / "ipython_kernel_config.json").read_text()
    )
    assert kernel_config["InteractiveShellApp"]["extra_extensions"] == ["jupyter_ext"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    # `jupyter server extension list` reads only the user, sys-prefix and system config
    # folders, so the prefix's stands in as the user's.
    env.update(PYTHONPATH=str(site), JUPYTER_PATH=str(prefix / "share" / "jupyter"),
               JUPYTER_CONFIG_DIR=str(prefix / "etc" / "jupyter"))  # fmt: skip
    labext = subprocess.run(
        [sys.executable, "-m", "jupyterlab.labextensions", "list"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    out = re.sub(r"\x1b\[[0-9;]*m", "", labext.stdout + labext.stderr)
    assert str(prefix) in out, out
    assert "@gpupool/labextension v0.1.0 enabled OK (python, gpupool)" in out, out
    server = subprocess.run(
        [sys.executable, "-m", "jupyter_server.extension.serverextension", "list"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    out = re.sub(r"\x1b\[[0-9;]*m", "", server.stdout + server.stderr)
    assert "jupyter_ext enabled" in out and "jupyter_ext 0.1.0 OK" in out, out
    assert str(site) in subprocess.run(
        [sys.executable, "-c", "import jupyter_ext; print(jupyter_ext.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    ).stdout  # fmt: skip


def test_usage_is_split_at_utc_midnights() -> None:
    """An interval over a midnight counts on both days; one still open counts until now."""
    from datetime import datetime, timezone

    from jupyter_ext.server_extension import USAGE_DAYS, summarize

    def at(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()

    first, now = at("2026-11-03T00:00:00"), at("2026-12-02T12:00:00")
    interval = {"kernel_id": "k1", "gpu_type": "H100", "gpu_count": 2,
                "usd_per_gpu_second": 0.001, "open": False}  # fmt: skip
    report = {"intervals": [
        {**interval, "start": "2026-11-30T23:00:00.000000Z", "end": "2026-12-01T01:00:00.000000Z"},
        {**interval, "kernel_id": "k2", "gpu_count": 1, "open": True,
         "start": "2026-12-02T11:00:00.000000Z", "end": None},
        {**interval, "kernel_id": "k3", "start": "2026-10-01T00:00:00.000000Z",
         "end": "2026-11-03T00:30:00.000000Z"},
    ], "budget": {"budget_usd": 10.0}}  # fmt: skip
    usage = summarize(report, first, now)
    days = {d["date"]: d for d in usage["days"]}
    assert len(days) == USAGE_DAYS and usage["days"][-1]["date"] == "2026-12-02"
    assert days["2026-11-30"]["gpu_hours"] == 2.0 and days["2026-12-01"]["gpu_hours"] == 2.0
    assert days["2026-11-30"]["cost_usd"] == 7.2  # 3600 s x 2 GPUs x $0.001
    assert days["2026-12-02"]["gpu_hours"] == 1.0  # k2, open, until now
    assert days["2026-11-03"]["gpu_hours"] == 1.0  # k3 only from the first day
    kernels = {k["kernel_id"]: k for k in usage["kernels"]}
    assert kernels["k1"]["gpu_hours"] == 4.0 and kernels["k2"]["open"]
    assert usage["total_gpu_hours"] == 6.0 and usage["budget"] == {"budget_usd": 10.0}


def test_a_companion_is_seen_by_its_gateway_id_only_for_its_tenant(
    stack: Gateway, tmp_path: Path
) -> None:
    """A `%%gpu` companion is a gateway kernel no Jupyter server started: the status bar asks
    for it by its gateway id; another tenant's kernel is a 404, its token never shown."""
    server = start_server(
        tmp_path / "hybrid", env={"GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": stack.token}
    )
    other = stack.tenant("companion-other")
    mine = stack.call("POST", "/api/kernels", {"name": "python3-gpu-h100-x1"}).body
    theirs = stack.call("POST", "/api/kernels", {"name": "python3-gpu-a10g-x1"}, token=other).body
    try:
        status, text = server.get(f"/gpupool/companions/{mine['id']}")
        assert status == 200, text
        info = json.loads(text)
        assert info["id"] == mine["id"] and info["gpupool"]["gpu_type"] == "H100", info
        assert "idle_seconds_left" in info["gpupool"] and stack.token not in text
        status, text = server.get(f"/gpupool/companions/{theirs['id']}")
        assert status == 404 and other not in text, text
        # As a local kernel's id, a gateway id is not one of this server's kernels.
        assert server.get(f"/gpupool/kernels/{mine['id']}")[0] == 404
    finally:
        stack.call("DELETE", f"/api/kernels/{mine['id']}")
        stack.call("DELETE", f"/api/kernels/{theirs['id']}", token=other)
        server.stop()
    assert stack.token not in server.log_path.read_text()


def test_beside_local_kernels_pool_shapes_are_kernelspecs(stack: Gateway, tmp_path: Path) -> None:
    """Not in gateway mode, with only GPUPOOL_URL/GPUPOOL_TOKEN: at start the server extension
    installs a kernelspec per pool shape (the provisioner's), listed beside local python3."""
    data = tmp_path / "data"
    server = start_server(
        tmp_path / "hybrid",
        env={"GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": stack.token, "JUPYTER_DATA_DIR": str(data)},
    )  # fmt: skip
    try:
        deadline, names = time.monotonic() + 30, set()
        while time.monotonic() < deadline and "python3-gpu-h100-x1" not in names:
            status, body = server.get("/api/kernelspecs")
            assert status == 200, body
            names = set(json.loads(body)["kernelspecs"])
            time.sleep(0.3)
        assert {"python3", "python3-gpu-h100-x1"} <= names, names
        spec = (data / "kernels" / "python3-gpu-h100-x1" / "kernel.json").read_text()
        assert "gpupool-provisioner" in spec and stack.token not in spec
    finally:
        server.stop()
    assert stack.token not in server.log_path.read_text()
