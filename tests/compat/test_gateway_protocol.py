"""The gateway against what a stock jupyter_server's gateway client sends and relies on
(DESIGN.md, "Clients to gateway"): status codes, model and kernelspec formats, the odd URL forms
the client builds, the env it sends, JSON errors, and the kernel websocket in both framings.

Most tests speak plain HTTP, as black-box checks; one drives jupyter_server's own
`GatewayKernelSpecManager` and `GatewayMappingKernelManager` against the gateway."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from kernel_ws import V1, KernelSocket, run_code
from tornado.httpclient import HTTPClientError

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # what GatewayKernelManager.refresh_model parses
MISSING = "00000000-0000-4000-8000-000000000000"
SPECS = {"python3", "python3-gpu-h100-x1", "python3-gpu-h100-x2", "python3-gpu-a10g-x1"}
DISPLAY = {
    "python3-gpu-h100-x1": "Python 3 · H100 ×1 · $3.95/h",  # noqa: RUF001
    "python3-gpu-h100-x2": "Python 3 · H100 ×2 · $7.90/h",  # noqa: RUF001
    "python3-gpu-a10g-x1": "Python 3 · A10G ×1 · $1.10/h",  # noqa: RUF001
}
# What a client's environment typically holds: jupyter_server sends every KERNEL_* variable.
CLIENT_ENV = {
    "KERNEL_USERNAME": "mallory",
    "KERNEL_WORKING_DIR": "/home/someone/notebooks/does-not-exist-here",
    "KERNEL_LAUNCH_TIMEOUT": "40",
    "KERNEL_EXTRA_SPARK_OPTS": "--conf spark.x=1",
}
STATES = {"queued", "starting", "running", "suspended", "resuming", "dead"}


def check_error(reply: Any, status: int, *words: str) -> None:
    """An error is JSON {reason, message}, with a message a person can act on."""
    assert reply.status == status, (reply.status, reply.body)
    assert isinstance(reply.body, dict), reply.body
    assert isinstance(reply.body.get("reason"), str) and reply.body["reason"], reply.body
    assert isinstance(reply.body.get("message"), str) and len(reply.body["message"]) > 10
    assert reply.headers.get("Content-Type", "").startswith("application/json"), reply.headers
    for word in words:
        assert word in reply.body["message"], reply.body


def check_model(model: dict[str, Any], name: str | None = None) -> None:
    assert str(uuid.UUID(model["id"])) == model["id"]
    assert isinstance(model["name"], str)
    if name is not None:
        assert model["name"] == name
    stamp = datetime.strptime(model["last_activity"], TIME_FORMAT).replace(tzinfo=timezone.utc)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", model["last_activity"])
    assert abs(stamp.timestamp() - time.time()) < 600
    assert model["execution_state"] in ("starting", "idle", "busy", "dead", "unknown")
    assert isinstance(model["connections"], int) and not isinstance(model["connections"], bool)
    gpupool = model["gpupool"]
    assert gpupool["state"] in STATES
    assert isinstance(gpupool["gpu_count"], int)
    assert (gpupool["gpu_type"] is None) == (gpupool["gpu_count"] == 0)
    assert isinstance(gpupool["billed_seconds"], (int, float)) and gpupool["billed_seconds"] >= 0
    assert isinstance(gpupool["cost_usd"], (int, float)) and gpupool["cost_usd"] >= 0
    assert isinstance(gpupool["reason"], str)
    if gpupool["state"] == "queued":
        assert isinstance(gpupool["queue_position"], int) and gpupool["queue_position"] >= 1


def listed(stack: Any) -> dict[str, dict[str, Any]]:
    reply = stack.call("GET", "/api/kernels")
    assert reply.status == 200, reply.body
    assert isinstance(reply.body, list)
    return {k["id"]: k for k in reply.body}


def delete(stack: Any, kernel_id: str) -> None:
    reply = stack.call("DELETE", f"/api/kernels/{kernel_id}")
    assert reply.status == 204, reply.body


@pytest.fixture
def kernel(stack: Any) -> Iterator[dict[str, Any]]:
    """A running one-H100 kernel, shut down after the test."""
    model = stack.create(name="python3-gpu-h100-x1", env=dict(CLIENT_ENV))
    yield model
    stack.call("DELETE", f"/api/kernels/{model['id']}")


# -- kernelspecs -------------------------------------------------------------------------------


def test_kernelspecs_list_format(stack):
    reply = stack.call("GET", "/api/kernelspecs")
    assert reply.status == 200, reply.body
    assert reply.body["default"] == "python3"
    specs = reply.body["kernelspecs"]
    assert set(specs) == SPECS
    for name, entry in specs.items():
        assert entry["name"] == name
        assert isinstance(entry["resources"], dict)
        spec = entry["spec"]
        assert isinstance(spec["argv"], list) and all(isinstance(a, str) for a in spec["argv"])
        assert spec["language"] == "python"
        gpupool = spec["metadata"]["gpupool"]
        assert set(gpupool) >= {"gpu_type", "gpu_count", "memory_gb", "usd_per_hour", "free"}
        assert "queue" in gpupool
        for key in ("gpu_count", "memory_gb", "free", "queue"):
            assert isinstance(gpupool[key], int) and gpupool[key] >= 0, (name, key, gpupool)
        assert isinstance(gpupool["usd_per_hour"], (int, float))
        if name != "python3":
            assert spec["display_name"] == DISPLAY[name]
    cpu = specs["python3"]["spec"]["metadata"]["gpupool"]
    assert cpu["gpu_type"] is None and cpu["gpu_count"] == 0 and cpu["usd_per_hour"] == 0
    h100 = specs["python3-gpu-h100-x2"]["spec"]["metadata"]["gpupool"]
    # memory_gb: what the kernel gets, both GPUs together (issue 10); per GPU beside it.
    assert (h100["gpu_type"], h100["gpu_count"], h100["memory_gb"]) == ("H100", 2, 160)
    assert h100["memory_gb_per_gpu"] == 80
    assert h100["usd_per_hour"] == pytest.approx(7.90) and h100["free"] == 2
    a10g = specs["python3-gpu-a10g-x1"]["spec"]["metadata"]["gpupool"]
    assert (a10g["gpu_type"], a10g["gpu_count"], a10g["memory_gb"]) == ("A10G", 1, 24)
    assert a10g["usd_per_hour"] == pytest.approx(1.10) and a10g["free"] == 1


def test_one_kernelspec_in_every_form_the_client_builds(stack):
    everything = stack.call("GET", "/api/kernelspecs").body["kernelspecs"]
    by_path = stack.call("GET", "/api/kernelspecs/python3-gpu-a10g-x1")
    assert by_path.status == 200 and by_path.body == everything["python3-gpu-a10g-x1"]
    # With KERNEL_USERNAME set, the client lists with ?user=NAME ...
    filtered = stack.call("GET", "/api/kernelspecs?user=alice")
    assert filtered.status == 200 and set(filtered.body["kernelspecs"]) == SPECS
    # ... and asks for one spec by appending it to that URL: ?user=NAME/specname.
    odd = stack.call("GET", "/api/kernelspecs?user=alice/python3-gpu-h100-x1")
    assert odd.status == 200 and odd.body == everything["python3-gpu-h100-x1"]
    cpu = stack.call("GET", "/api/kernelspecs?user=alice/python3")
    assert cpu.status == 200 and cpu.body["name"] == "python3"


@pytest.mark.parametrize(
    "path", ["/api/kernelspecs/python4", "/api/kernelspecs?user=alice/python4"]
)
def test_unknown_kernelspec_is_404_naming_what_exists(stack, path):
    # The client turns this 404 into the KeyError the notebook handlers expect.
    check_error(stack.call("GET", path), 404, "python4", "python3-gpu-h100-x1")


@pytest.mark.parametrize(
    "path", ["/kernelspecs/python3/logo-64x64.png", "/kernelspecs/python3-gpu-h100-x1/kernel.js",
             "/kernelspecs/nope/logo-32x32.png"],
)  # fmt: skip
def test_kernelspec_resources_are_json_404(stack, path):
    # The client turns a 404 here into "no resource" (None), so the picker shows no logo.
    check_error(stack.call("GET", path), 404)


def test_free_and_queue_follow_the_pool(stack, kernel):
    spec = stack.call("GET", "/api/kernelspecs/python3-gpu-h100-x1").body
    assert spec["spec"]["metadata"]["gpupool"]["free"] == 1
    assert spec["spec"]["metadata"]["gpupool"]["queue"] == 0


# -- kernels over REST -------------------------------------------------------------------------


def test_create_get_list_delete(stack):
    body = {"name": "python3-gpu-h100-x1", "env": dict(CLIENT_ENV)}
    reply = stack.call("POST", "/api/kernels", body)
    assert reply.status == 201, reply.body
    model = reply.body
    check_model(model, "python3-gpu-h100-x1")
    kernel_id = model["id"]
    assert reply.headers["Location"] == f"/api/kernels/{kernel_id}"
    assert model["gpupool"]["state"] in ("starting", "running")
    assert (model["gpupool"]["gpu_type"], model["gpupool"]["gpu_count"]) == ("H100", 1)

    got = stack.call("GET", f"/api/kernels/{kernel_id}")
    assert got.status == 200
    check_model(got.body, "python3-gpu-h100-x1")
    assert got.body["id"] == kernel_id
    assert got.body["connections"] == 0
    stack.wait_for(
        lambda: (
            stack.call("GET", f"/api/kernels/{kernel_id}").body["gpupool"]["state"] == "running"
        ),
        what="the kernel to run",
    )

    assert kernel_id in listed(stack)
    check_model(listed(stack)[kernel_id])

    deleted = stack.call("DELETE", f"/api/kernels/{kernel_id}")
    assert deleted.status == 204 and deleted.body == ""
    check_error(stack.call("GET", f"/api/kernels/{kernel_id}"), 404, kernel_id)
    assert kernel_id not in listed(stack)
    # The client ignores a 404 on shutdown, so a second DELETE must be exactly that.
    check_error(stack.call("DELETE", f"/api/kernels/{kernel_id}"), 404, kernel_id)


def test_cpu_kernel_is_the_default(stack):
    model = stack.create(env={})
    try:
        check_model(model, "python3")
        assert model["gpupool"]["gpu_type"] is None and model["gpupool"]["gpu_count"] == 0
        code = "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"
        out = asyncio.run(run_code(stack.url, stack.token, model["id"], code))
        assert out.strip() in ("''", "None")
    finally:
        delete(stack, model["id"])


def test_interrupt_is_204_and_restart_is_200_with_the_model(stack, kernel):
    kernel_id = kernel["id"]
    interrupted = stack.call("POST", f"/api/kernels/{kernel_id}/interrupt", {})
    assert interrupted.status == 204 and interrupted.body == ""
    asyncio.run(run_code(stack.url, stack.token, kernel_id, "x = 41"))
    restarted = stack.call("POST", f"/api/kernels/{kernel_id}/restart", {})
    assert restarted.status == 200, restarted.body
    check_model(restarted.body, "python3-gpu-h100-x1")
    assert restarted.body["id"] == kernel_id
    # Same id, fresh namespace, same GPU shape.
    code = "import os; print('x' in globals(), len(os.environ['CUDA_VISIBLE_DEVICES'].split(',')))"
    out = asyncio.run(run_code(stack.url, stack.token, kernel_id, code))
    assert out.split() == ["False", "1"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/api/kernels/{MISSING}"),
        ("DELETE", f"/api/kernels/{MISSING}"),
        ("POST", f"/api/kernels/{MISSING}/interrupt"),
        ("POST", f"/api/kernels/{MISSING}/restart"),
    ],
)
def test_unknown_kernel_ids_are_404(stack, method, path):
    reply = stack.call(method, path, {} if method == "POST" else None)
    check_error(reply, 404, MISSING)
    assert reply.body["reason"] == "Not Found"


def test_unknown_kernel_websocket_is_404(stack):
    with pytest.raises(HTTPClientError) as refused:
        asyncio.run(KernelSocket.open(stack.url, stack.token, MISSING))
    assert refused.value.code == 404
    assert refused.value.response is not None
    body = json.loads(refused.value.response.body)
    assert set(body) >= {"reason", "message"} and MISSING in body["message"]


# -- env ---------------------------------------------------------------------------------------


def test_client_env_is_accepted_and_username_is_only_a_label(stack):
    env = {**CLIENT_ENV, "KERNEL_ID": "not-an-id", "KERNEL_GATEWAY": "1", "LANG": "C.UTF-8"}
    model = stack.create(name="python3-gpu-a10g-x1", env=env)
    try:
        code = (
            "import os, json; print(json.dumps({k: os.environ.get(k) for k in "
            "('KERNEL_USERNAME', 'KERNEL_LAUNCH_TIMEOUT', 'GPUPOOL_TENANT')})); "
            "print(json.dumps(os.getcwd()))"
        )
        out = asyncio.run(run_code(stack.url, stack.token, model["id"], code))
        seen, cwd = (json.loads(line) for line in out.splitlines())
        assert seen["KERNEL_USERNAME"] == "mallory"
        assert seen["KERNEL_LAUNCH_TIMEOUT"] == "40"
        assert seen["GPUPOOL_TENANT"] and seen["GPUPOOL_TENANT"] != "mallory"
        assert cwd != CLIENT_ENV["KERNEL_WORKING_DIR"]
        assert model["id"] != "not-an-id"
    finally:
        delete(stack, model["id"])


@pytest.mark.parametrize(
    ("name", "env", "shape", "visible"),
    [
        ("python3", {"KERNEL_GPU_TYPE": "h100", "KERNEL_GPU_COUNT": "1"},
         ("python3-gpu-h100-x1", "H100", 1), 1),
        ("python3-gpu-h100-x1", {"KERNEL_GPU_COUNT": "2"}, ("python3-gpu-h100-x2", "H100", 2), 2),
        ("python3-gpu-h100-x2", {"KERNEL_GPU_TYPE": "A10G", "KERNEL_GPU_COUNT": "1"},
         ("python3-gpu-a10g-x1", "A10G", 1), 1),
        ("python3-gpu-h100-x1", {"KERNEL_GPU_COUNT": "0"}, ("python3", None, 0), 0),
    ],
)  # fmt: skip
def test_env_overrides_the_shape(stack, name, env, shape, visible):
    model = stack.create(name=name, env={**CLIENT_ENV, **env})
    try:
        gpupool = model["gpupool"]
        assert (model["name"], gpupool["gpu_type"], gpupool["gpu_count"]) == shape
        code = (
            "import os; print(len([d for d in os.environ.get('CUDA_VISIBLE_DEVICES', '')"
            ".split(',') if d]))"
        )
        out = asyncio.run(run_code(stack.url, stack.token, model["id"], code))
        assert int(out) == visible
    finally:
        delete(stack, model["id"])


# -- the websocket -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [None, V1], ids=["legacy-json", "v1"])
def test_websocket_round_trip_in_both_framings(stack, kernel, protocol):
    async def talk() -> tuple[str | None, dict[str, Any], str, int]:
        sock = await KernelSocket.open(stack.url, stack.token, kernel["id"], protocol)
        try:
            info = await sock.kernel_info()
            out, reply = await sock.execute("print(6 * 7)")
            assert reply["status"] == "ok"
            connections = stack.call("GET", f"/api/kernels/{kernel['id']}").body["connections"]
            return sock.protocol, info, out, connections
        finally:
            sock.close()

    chosen, info, out, connections = asyncio.run(talk())
    assert chosen == protocol
    assert info["channel"] == "shell"
    assert info["content"]["status"] == "ok"
    assert info["content"]["language_info"]["name"] == "python"
    assert out == "42\n"
    assert connections == 1
    stack.wait_for(
        lambda: stack.call("GET", f"/api/kernels/{kernel['id']}").body["connections"] == 0,
        what="the connection count to drop back to 0",
    )


def test_waiting_is_not_failing(stack):
    """A kernel queued for a GPU answers 201 at once, is listed, accepts a websocket whose
    messages are held, and runs them when a GPU frees up."""
    holder = stack.create(name="python3-gpu-h100-x2")
    queued_id = ""
    try:
        started = time.monotonic()
        reply = stack.call("POST", "/api/kernels", {"name": "python3-gpu-h100-x1", "env": {}})
        assert reply.status == 201, reply.body
        assert time.monotonic() - started < 5
        queued = reply.body
        queued_id = queued["id"]
        check_model(queued, "python3-gpu-h100-x1")
        assert queued["gpupool"]["state"] == "queued"
        assert queued["gpupool"]["queue_position"] == 1
        assert queued["execution_state"] == "starting"
        assert listed(stack)[queued_id]["gpupool"]["state"] == "queued"
        spec = stack.call("GET", "/api/kernelspecs/python3-gpu-h100-x1").body
        assert spec["spec"]["metadata"]["gpupool"]["free"] == 0
        assert spec["spec"]["metadata"]["gpupool"]["queue"] == 1

        async def held_then_answered() -> dict[str, Any]:
            sock = await KernelSocket.open(stack.url, stack.token, queued_id)
            try:
                msg_id = await sock.send("shell", "kernel_info_request", {})
                await asyncio.sleep(0.3)
                assert stack.call("GET", f"/api/kernels/{queued_id}").body["gpupool"]["state"] == (
                    "queued"
                )
                await asyncio.to_thread(delete, stack, holder["id"])
                while True:
                    msg = await sock.recv(60)
                    if msg["msg_type"] == "kernel_info_reply":
                        return {**msg, "sent_id": msg_id}
            finally:
                sock.close()

        answer = asyncio.run(held_then_answered())
        assert answer["parent_header"]["msg_id"] == answer["sent_id"]
        assert answer["content"]["status"] == "ok"
        model = stack.call("GET", f"/api/kernels/{queued_id}").body
        assert model["gpupool"]["state"] == "running" and "queue_position" not in model["gpupool"]
    finally:
        stack.call("DELETE", f"/api/kernels/{holder['id']}")
        if queued_id:
            stack.call("DELETE", f"/api/kernels/{queued_id}")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "token", "status"),
    [
        ("GET", "/api/kernels", "", 401),
        ("GET", "/api/kernelspecs", "not-a-token", 401),
        ("GET", "/api/nothing-here", None, 404),
        ("PUT", "/api/kernels", None, 405),
        ("PATCH", f"/api/kernels/{MISSING}", None, 405),
        ("GET", "/api/kernels/not-a-uuid", None, 404),
    ],
)
def test_every_error_is_json_reason_and_message(stack, method, path, token, status):
    reply = stack.call(method, path, {} if method in ("PUT", "PATCH") else None, token=token)
    check_error(reply, status)


def test_errors_on_create_are_json(stack):
    check_error(stack.call("POST", "/api/kernels", raw=b"{nope"), 400, "JSON")
    check_error(stack.call("POST", "/api/kernels", {"name": "python3-gpu-tpu-x1"}), 400, "H100")


# -- jupyter_server's own gateway client -------------------------------------------------------


def test_jupyter_servers_gateway_client_end_to_end(stack, monkeypatch):
    from jupyter_server.gateway.gateway_client import GatewayClient
    from jupyter_server.gateway.managers import (
        GatewayKernelSpecManager,
        GatewayMappingKernelManager,
    )
    from traitlets.config import Configurable

    monkeypatch.setenv("KERNEL_USERNAME", "alice")
    monkeypatch.setenv("KERNEL_LAUNCH_TIMEOUT", "40")
    GatewayClient.clear_instance()
    GatewayClient.instance(url=stack.url, auth_token=stack.token)

    class Server(Configurable):
        """What the managers read from their parent, the server app."""

        base_url = "/"
        kernel_manager = GatewayMappingKernelManager()

    async def drive() -> None:
        server = Server()
        kernelspecs = GatewayKernelSpecManager(parent=server)
        specs = await kernelspecs.get_all_specs()
        assert set(specs) == SPECS
        spec = await kernelspecs.get_kernel_spec("python3-gpu-a10g-x1")  # ?user=alice/NAME
        assert spec["spec"]["display_name"] == DISPLAY["python3-gpu-a10g-x1"]
        with pytest.raises(KeyError):
            await kernelspecs.get_kernel_spec("python4")
        assert await kernelspecs.get_kernel_spec_resource("python3", "logo-64x64.png") is None

        kernels = server.kernel_manager
        kernel_id = await kernels.start_kernel(kernel_name="python3-gpu-a10g-x1", path="nb.ipynb")
        try:
            manager = kernels.get_kernel(kernel_id)
            assert manager.kernel["gpupool"]["gpu_type"] == "A10G"
            assert [m["id"] for m in await kernels.list_kernels()] == [kernel_id]
            await kernels.interrupt_kernel(kernel_id)
            await kernels.restart_kernel(kernel_id)
            model = await manager.refresh_model()
            assert model["id"] == kernel_id and manager.execution_state in ("idle", "busy")
            assert await manager.is_alive()
        finally:
            await kernels.shutdown_kernel(kernel_id)
        assert await kernels.list_kernels() == []

    try:
        asyncio.run(drive())
    finally:
        GatewayClient.clear_instance()
    assert (
        stack.call("GET", "/api/kernelspecs/python3-gpu-a10g-x1").body["spec"]["metadata"][
            "gpupool"
        ]["free"]
        == 1
    )
