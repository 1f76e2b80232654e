"""Lab's GPU pool settings that the server applies: PUT /gpupool/preferences `{"idleTimeout": N}`
(Lab's auth, a bounded JSON body, checked) gives every pool kernel a session starts afterwards
idle timeout N at the gateway, beside local kernels (the pool provisioner) and in gateway mode;
a value outside the tenant's bounds is the gateway's to refuse, and the refusal says so."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway
from test_lab_extension import LabServer, start_server

SHAPE = "python3-gpu-h100-x1"


def call(
    lab: LabServer, method: str, path: str, body: Any = None, auth: bool = True
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Authorization": f"token {lab.token}"} if auth else {}
    request = urllib.request.Request(lab.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        text, status = error.read().decode(), error.code
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def wait_for_pool_kernelspec(lab: LabServer) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, specs = call(lab, "GET", "/api/kernelspecs")
        if status == 200 and SHAPE in specs["kernelspecs"]:
            return
        time.sleep(0.3)
    raise AssertionError(f"no {SHAPE} kernelspec: {lab.log_path.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def hybrid(stack: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """Local kernels plus the pool's, by GPUPOOL_URL/GPUPOOL_TOKEN and the pool provisioner."""
    folder = tmp_path_factory.mktemp("hybrid")
    lab = start_server(
        folder,
        env={"GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": stack.token,
             "JUPYTER_DATA_DIR": str(folder / "data")},
    )  # fmt: skip
    wait_for_pool_kernelspec(lab)
    yield lab
    lab.stop()
    assert stack.token not in lab.log_path.read_text()


def gateway_ids(stack: Gateway, token: str) -> set[str]:
    return {k["id"] for k in stack.call("GET", "/api/kernels", token=token).body}


def start_session(
    lab: LabServer, kernel: str, stack: Gateway | None = None, token: str = ""
) -> dict[str, Any]:
    """A notebook session as Lab's launcher starts one; with `stack`, also the id the gateway
    gave its pool kernel (as `gateway_id`)."""
    before = gateway_ids(stack, token or stack.token) if stack else set()
    name = f"{uuid.uuid4().hex[:8]}.ipynb"
    status, session = call(lab, "POST", "/api/sessions",
                           {"path": name, "name": name, "type": "notebook",
                            "kernel": {"name": kernel}})  # fmt: skip
    assert status == 201, session
    if stack:
        (session["gateway_id"],) = gateway_ids(stack, token or stack.token) - before
    return dict(session)


def end_session(lab: LabServer, session: dict[str, Any]) -> None:
    status, body = call(lab, "DELETE", f"/api/sessions/{session['id']}")
    assert status == 204, body


def idle_timeout(lab: LabServer, stack: Gateway, session: dict[str, Any], token: str = "") -> Any:
    """The pool kernel's idle timeout as the gateway keeps it, and as Lab's status bar sees it."""
    model = stack.call("GET", f"/api/kernels/{session['gateway_id']}", token=token or stack.token)
    assert model.status == 200, model.body
    status, info = call(lab, "GET", f"/gpupool/kernels/{session['kernel']['id']}")
    assert (
        status == 200 and info["gpupool"]["idle_timeout"] == model.body["gpupool"]["idle_timeout"]
    )
    return model.body["gpupool"]["idle_timeout"]


def test_preferences_need_labs_auth(hybrid: LabServer) -> None:
    assert call(hybrid, "GET", "/gpupool/preferences", auth=False)[0] == 403
    assert call(hybrid, "PUT", "/gpupool/preferences", {"idleTimeout": 60}, auth=False)[0] == 403
    assert call(hybrid, "GET", "/gpupool/preferences") == (200, {"idleTimeout": 0})


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "Send a JSON object"),
        (b"[60]", 400, "Send a JSON object"),
        (b"", 400, "Send a JSON object"),
        ({"idleTimeout": 60, "token": "x"}, 400, "Unknown preference 'token'"),
        ({"idleTimeout": "600"}, 400, "whole seconds"),
        ({"idleTimeout": 1.5}, 400, "whole seconds"),
        ({"idleTimeout": True}, 400, "whole seconds"),
        ({"idleTimeout": None}, 400, "whole seconds"),
        ({"idleTimeout": -1}, 400, "out of range: 0 (the gateway's default) to 604800"),
        ({"idleTimeout": 604801}, 400, "out of range"),
        (b'{"idleTimeout": 60, "pad": "' + b"x" * 5000 + b'"}', 413, "at most 4096"),
    ],
)
def test_bad_preferences_are_refused(hybrid: LabServer, body: Any, status: int, says: str) -> None:
    answer = call(hybrid, "PUT", "/gpupool/preferences", body)
    assert answer[0] == status, answer
    assert answer[1]["reason"] == "bad preferences" and says in answer[1]["message"], answer
    assert call(hybrid, "GET", "/gpupool/preferences") == (200, {"idleTimeout": 0})


def test_idle_timeout_reaches_pool_kernels_started_after(hybrid: LabServer, stack: Gateway) -> None:
    before = start_session(hybrid, SHAPE, stack)
    try:
        assert idle_timeout(hybrid, stack, before) == 600
        assert call(hybrid, "PUT", "/gpupool/preferences", {"idleTimeout": 123}) == (
            200,
            {"idleTimeout": 123},
        )
        after = start_session(hybrid, SHAPE, stack)
        try:
            assert idle_timeout(hybrid, stack, after) == 123
            # The kernel started before keeps its own.
            assert idle_timeout(hybrid, stack, before) == 600
        finally:
            end_session(hybrid, after)
        assert call(hybrid, "PUT", "/gpupool/preferences", {})[1] == {"idleTimeout": 123}
        assert call(hybrid, "PUT", "/gpupool/preferences", {"idleTimeout": 0})[0] == 200
        again = start_session(hybrid, SHAPE, stack)
        try:
            assert idle_timeout(hybrid, stack, again) == 600
        finally:
            end_session(hybrid, again)
    finally:
        end_session(hybrid, before)
    stack.wait_for(lambda: stack.call("GET", "/api/kernels").body == [], 15, "no kernels left")


def test_in_gateway_mode_too(stack: Gateway, tmp_path: Path) -> None:
    """As `gpupool up` runs Lab: jupyter_server's gateway client passes the kernel's
    KERNEL_IDLE_TIMEOUT on to the gateway."""
    lab = start_server(tmp_path, f"--gateway-url={stack.url}",
                       env={"JUPYTER_GATEWAY_AUTH_TOKEN": stack.token})  # fmt: skip
    try:
        assert call(lab, "PUT", "/gpupool/preferences", {"idleTimeout": 77})[0] == 200
        session = start_session(lab, SHAPE)
        try:  # in gateway mode Lab's kernel id is the gateway's
            model = stack.call("GET", f"/api/kernels/{session['kernel']['id']}").body
            assert model["gpupool"]["idle_timeout"] == 77
        finally:
            end_session(lab, session)
    finally:
        lab.stop()
    # (Not the log: stock gateway mode logs each session kernel's environment, the server's
    # own gateway token among it; `gpupool up` keeps only a scrubbed copy.)


def test_outside_the_tenants_bounds_the_gateway_says_so(stack: Gateway, tmp_path: Path) -> None:
    token = stack.tenant("short-idle", idle_max=100)
    lab = start_server(tmp_path, env={"GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": token,
                                      "JUPYTER_DATA_DIR": str(tmp_path / "data")})  # fmt: skip
    try:
        wait_for_pool_kernelspec(lab)
        assert call(lab, "PUT", "/gpupool/preferences", {"idleTimeout": 500})[0] == 200
        name = "refused.ipynb"
        status, answer = call(lab, "POST", "/api/sessions",
                              {"path": name, "name": name, "type": "notebook",
                               "kernel": {"name": SHAPE}})  # fmt: skip
        assert status >= 400, answer
        message = json.dumps(answer)
        assert "tenant short-idle may use 1 to 100 seconds" in message, message
        assert "Settings > GPU pool" in message, message
        assert token not in message
        # Local kernels are untouched, and a value within bounds works.
        local = start_session(lab, "python3")
        end_session(lab, local)
        assert call(lab, "PUT", "/gpupool/preferences", {"idleTimeout": 90})[0] == 200
        session = start_session(lab, SHAPE, stack, token)
        try:
            assert idle_timeout(lab, stack, session, token) == 90
        finally:
            end_session(lab, session)
    finally:
        lab.stop()
    assert token not in lab.log_path.read_text()
