"""The Lab extension's shared-link routes (/gpupool/shares) of a real jupyter_server beside local
kernels, against the embedded stack: tenant A shares a notebook of its workspace with the
packages its kernel reports (a pool GPU kernel and a local one); tenant B writes its own copy
set to the pool's H100 kernelspec and compares packages with its own kernel. Lab's auth, bad
input, unknown, revoked and view-only links, an unreachable gateway: each a clear JSON error,
and neither tenant's token in an answer or a log."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import Gateway, free_port
from nbformat.v4 import new_code_cell, new_notebook, new_output
from test_lab_extension import LabServer, start_server

H100 = "python3-gpu-h100-x1"


def write_notebook(folder: Path, name: str, kernel: str = H100) -> None:
    nb = new_notebook(
        cells=[new_code_cell("x = 6 * 7\nx", execution_count=1, outputs=[
            new_output("execute_result", execution_count=1, data={"text/plain": "42"})])],
        metadata={"kernelspec": {"name": kernel, "display_name": kernel, "language": "python"}},
    )  # fmt: skip
    (folder / name).write_text(nbformat.writes(nb))


def lab_for(folder: Path, stack: Gateway, token: str) -> LabServer:
    """A Jupyter server beside local kernels for the tenant of `token` (hybrid, as a user's own
    Lab), with the pool's kernelspecs in its own data folder."""
    env = {"GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": token, "JUPYTER_DATA_DIR": str(folder / "d")}
    server = start_server(folder, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the pool's kernelspecs are synced at start
        if H100 in json.loads(server.get("/api/kernelspecs")[1])["kernelspecs"]:
            return server
        time.sleep(0.2)
    server.stop()
    raise AssertionError("the pool's kernelspecs were not synced")


def post(lab: LabServer, path: str, body: Any, auth: bool = True) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, text = lab.send("POST", path, raw, auth)
    return status, json.loads(text) if text else None


@pytest.fixture(scope="module")
def bob(stack: Gateway) -> str:
    return stack.tenant("bob")


@pytest.fixture(scope="module")
def alice_lab(stack: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    folder = tmp_path_factory.mktemp("alice")
    write_notebook(folder, "train.ipynb")
    write_notebook(folder, "local.ipynb", kernel="python3")
    (folder / "notes.txt").write_text("not a notebook")
    (folder / "broken.ipynb").write_text("{ not json")
    server = lab_for(folder, stack, stack.token)
    yield server
    server.stop()
    assert stack.token not in server.log_path.read_text()


@pytest.fixture(scope="module")
def bob_lab(
    stack: Gateway, bob: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LabServer]:
    server = lab_for(tmp_path_factory.mktemp("bob"), stack, bob)
    yield server
    server.stop()
    assert bob not in server.log_path.read_text()


@pytest.fixture(scope="module")
def alice_kernel(alice_lab: LabServer) -> Iterator[str]:
    """A pool H100 kernel of Alice's Lab (started by the provisioner)."""
    kernel = alice_lab.post("/api/kernels", {"name": H100})
    yield str(kernel["id"])
    alice_lab.delete(f"/api/kernels/{kernel['id']}")


@pytest.fixture(scope="module")
def run_link(alice_lab: LabServer, alice_kernel: str, stack: Gateway) -> dict[str, Any]:
    status, made = post(alice_lab, "/gpupool/shares", {
        "path": "train.ipynb", "kernel_id": alice_kernel, "mode": "run", "access": "gateway",
        "outputs": "keep", "expires_in": 3600,
    })  # fmt: skip
    assert status == 200, made
    assert stack.token not in json.dumps(made)
    return dict(made)


def test_every_share_route_needs_labs_auth(alice_lab: LabServer) -> None:
    for path in ("/gpupool/shares", "/gpupool/shares/open", "/gpupool/shares/differences"):
        status, _ = post(alice_lab, path, {"path": "train.ipynb"}, auth=False)
        assert status == 403, path


def test_a_share_holds_the_notebook_its_shape_and_its_kernels_packages(
    run_link: dict[str, Any], stack: Gateway
) -> None:
    assert run_link["link"] == f"{stack.url}/s/{run_link['id']}"
    assert (run_link["mode"], run_link["kernel_name"], run_link["gpu_type"]) == (
        "run",
        H100,
        "H100",
    )
    assert run_link["name"] == "train.ipynb" and run_link["expires"] is not None
    # The packages are those the kernel reported: this venv's, ipykernel among them.
    assert run_link["packages"] > 10
    [listed] = [s for s in stack.call("GET", "/api/shares").body if s["id"] == run_link["id"]]
    assert listed["access"] == "gateway"


def test_a_local_kernel_is_asked_too(alice_lab: LabServer) -> None:
    kernel = alice_lab.post("/api/kernels", {"name": "python3"})
    try:
        status, made = post(alice_lab, "/gpupool/shares", {
            "path": "local.ipynb", "kernel_id": kernel["id"], "outputs": "strip"})  # fmt: skip
        assert status == 200, made
        assert (made["kernel_name"], made["gpu_count"], made["outputs"]) == ("python3", 0, "strip")
        assert made["packages"] > 10 and made["mode"] == "view"
    finally:
        alice_lab.delete(f"/api/kernels/{kernel['id']}")


def test_another_tenant_opens_its_own_copy_on_the_h100_kernelspec(
    bob_lab: LabServer, run_link: dict[str, Any], bob: str
) -> None:
    folder = bob_lab.log_path.parent  # its workspace
    status, opened = post(bob_lab, "/gpupool/shares/open", {"link": run_link["link"]})
    assert status == 200, opened
    assert (opened["path"], opened["kernel_name"], opened["gpu_type"]) == ("train.ipynb", H100,
                                                                           "H100")  # fmt: skip
    assert opened["shared_by"] == "demo" and opened["packages"] > 10 and bob not in str(opened)
    copy = json.loads((folder / "train.ipynb").read_text())
    assert copy["metadata"]["kernelspec"]["name"] == H100
    assert copy["cells"][0]["outputs"][0]["data"]["text/plain"] == ["42"]
    assert run_link["id"] not in json.dumps(copy)  # the link's secret stays out of the file
    # Again, by the bare id, into a folder: a new name, the first copy kept.
    (folder / "shared").mkdir()
    status, again = post(bob_lab, "/gpupool/shares/open",
                         {"link": run_link["id"], "directory": "shared"})  # fmt: skip
    assert status == 200 and again["path"] == "shared/train.ipynb", again
    status, third = post(bob_lab, "/gpupool/shares/open", {"link": run_link["link"] + "/"})
    assert status == 200 and third["path"] == "train-1.ipynb", third
    # Bob's own kernel of that shape, and the packages compared with the share's.
    kernel = bob_lab.post("/api/kernels", {"name": H100})
    try:
        status, diff = post(bob_lab, "/gpupool/shares/differences",
                            {"path": "train.ipynb", "kernel_id": kernel["id"]})  # fmt: skip
        assert status == 200, diff
        assert diff["recorded"] and diff["differ"] == [] and diff["same"] == opened["packages"]
        assert diff["python"]["shared"] == diff["python"]["yours"]
    finally:
        bob_lab.delete(f"/api/kernels/{kernel['id']}")


def test_bad_input_is_a_clear_error(alice_lab: LabServer, alice_kernel: str) -> None:
    cases: list[tuple[Any, int, str]] = [
        (b"{not json", 400, "JSON object"),
        ([1, 2], 400, "JSON object"),
        ({}, 400, "path is missing"),
        ({"path": "train.ipynb", "token": "x"}, 400, "Unknown option 'token'"),
        ({"path": 7}, 400, "path must be"),
        ({"path": "a" * 2000}, 400, "path must be"),
        ({"path": "nothing.ipynb"}, 404, "No file"),
        ({"path": "../../etc/passwd"}, 404, "No file"),
        ({"path": "notes.txt"}, 400, "not a notebook"),
        ({"path": "broken.ipynb"}, 400, "not a readable notebook"),
        ({"path": "train.ipynb", "mode": "edit"}, 400, "mode must be"),
        ({"path": "train.ipynb", "access": "world"}, 400, "access must be"),
        ({"path": "train.ipynb", "expires_in": "7d"}, 400, "expires_in must be"),
        ({"path": "train.ipynb", "tenants": "bob"}, 400, "tenants must be"),
        ({"path": "train.ipynb", "kernel_id": "not-a-kernel"}, 400, "kernel_id must be"),
        ({"path": "train.ipynb", "kernel_id": str(uuid.uuid4())}, 404, "No such kernel"),
        # The gateway's own checks come back as they are.
        ({"path": "train.ipynb", "access": "tenants", "tenants": ["Not A Name"]}, 400,
         "is not a tenant name"),
        ({"path": "train.ipynb", "expires_in": 5}, 400, "expires_in is seconds"),
        (b"{" + b'"a": 1, ' * 3000 + b"}", 413, "at most"),
    ]  # fmt: skip
    for body, status, text in cases:
        got, answer = post(alice_lab, "/gpupool/shares", body)
        assert (got, text in answer["message"]) == (status, True), (body, answer)
    for body, status, text in [
        ({"link": "https://example.com/notebooks/x"}, 400, "not a shared notebook link"),
        ({"link": "javascript:alert(1)"}, 400, "not a shared notebook link"),
        ({"link": 5}, 400, "link must be"),
        ({"link": "A" * 32, "directory": "nowhere"}, 404, "No folder"),
        ({"link": "A" * 32}, 404, "No shared notebook at that link"),
        ({"link": "A" * 32, "kernel": H100}, 400, "Unknown option"),
    ]:
        got, answer = post(alice_lab, "/gpupool/shares/open", body)
        assert (got, text in answer["message"]) == (status, True), (body, answer)
    for body, status, text in [
        ({"path": "train.ipynb"}, 400, "kernel_id is missing"),
        ({"path": "train.ipynb", "kernel_id": alice_kernel}, 400, "not a copy of a shared"),
        ({"path": "train.ipynb", "kernel_id": str(uuid.uuid4())}, 404, "No such kernel"),
    ]:
        got, answer = post(alice_lab, "/gpupool/shares/differences", body)
        assert (got, text in answer["message"]) == (status, True), (body, answer)


def test_a_too_large_notebook_is_413_before_it_is_read(stack: Gateway, tmp_path: Path) -> None:
    write_notebook(tmp_path, "big.ipynb")
    with (tmp_path / "big.ipynb").open("a") as f:
        f.write(" " * 20_000)  # trailing blanks: still a notebook, now 20 kB
    server = start_server(tmp_path, "--GpupoolLab.max_share_mb=0.01",
                          env={"GPUPOOL_URL": stack.url, "GPUPOOL_TOKEN": stack.token})  # fmt: skip
    try:
        status, answer = post(server, "/gpupool/shares", {"path": "big.ipynb"})
        assert status == 413 and "at most 0.01 MB" in answer["message"], answer
    finally:
        server.stop()


def test_revoked_and_view_only_links_give_no_copy(
    alice_lab: LabServer, bob_lab: LabServer, stack: Gateway
) -> None:
    status, view = post(alice_lab, "/gpupool/shares", {"path": "train.ipynb"})
    assert status == 200 and view["mode"] == "view", view
    status, answer = post(bob_lab, "/gpupool/shares/open", {"link": view["link"]})
    assert status == 403 and "view-only" in answer["message"], answer
    status, run = post(alice_lab, "/gpupool/shares", {"path": "train.ipynb", "mode": "run"})
    assert stack.call("DELETE", f"/api/shares/{run['id']}").status == 204
    status, answer = post(bob_lab, "/gpupool/shares/open", {"link": run["link"]})
    assert status == 404 and "revoked" in answer["message"], answer
    # A link naming another host still goes only to this server's own gateway, by its id.
    status, answer = post(bob_lab, "/gpupool/shares/open",
                          {"link": f"http://127.0.0.1:{free_port()}/s/{run['id']}"})  # fmt: skip
    assert status == 404, answer


@pytest.mark.parametrize("case", ["unreachable", "not configured"])
def test_gateway_trouble_is_one_clear_json_error(case: str, tmp_path: Path) -> None:
    write_notebook(tmp_path, "train.ipynb")
    env = {"GPUPOOL_URL": f"http://127.0.0.1:{free_port()}", "GPUPOOL_TOKEN": "w" * 64}
    server = start_server(tmp_path, env=env if case == "unreachable" else {})
    try:
        for path, body in (("/gpupool/shares", {"path": "train.ipynb"}),
                           ("/gpupool/shares/open", {"link": "A" * 32})):  # fmt: skip
            status, answer = post(server, path, body)
            assert status == (502 if case == "unreachable" else 503), answer
            assert answer["reason"] == case.replace("unreachable", "gateway unreachable")
            assert "w" * 64 not in json.dumps(answer)
    finally:
        server.stop()
    assert "w" * 64 not in server.log_path.read_text()


def test_package_differences_name_each_changed_or_missing_package() -> None:
    from jupyter_ext.share_cli import package_differences

    shared = {"numpy": "2.1.3", "Torch": "2.5.1", "pandas": "2.2.0"}
    yours = {"NumPy": "2.1.3", "torch": "2.4.0"}
    assert package_differences(shared, yours) == [("Torch", "2.5.1", "2.4.0"),
                                                  ("pandas", "2.2.0", None)]  # fmt: skip
