"""Every malformed, oversized, out-of-range, unauthorized or over-quota request to the gateway
gets a clear JSON error {reason, message} with the right status, and the gateway keeps serving
(DESIGN.md, "Clients to gateway" and "Security")."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import urllib.parse
from typing import Any

import pytest
from conftest import start_gateway
from kernel_ws import NOT_V1_MESSAGES, V1, KernelSocket, closed_by, run_code
from tornado.httpclient import HTTPClientError

MISSING = "00000000-0000-4000-8000-000000000000"


def check_error(reply: Any, status: int, *words: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert isinstance(reply.body, dict) and set(reply.body) == {"reason", "message"}, reply.body
    assert reply.body["reason"] and len(reply.body["message"]) > 10
    assert reply.headers.get("Content-Type", "").startswith("application/json")
    for word in words:
        assert word in reply.body["message"], reply.body


def post(stack: Any, body: Any, token: str | None = None) -> Any:
    return stack.call("POST", "/api/kernels", body, token=token)


# -- bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"name": "python3",', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"python3"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"42", "must be a JSON object"),
    ],
)
def test_malformed_bodies_are_400(stack, raw, words):
    check_error(stack.call("POST", "/api/kernels", raw=raw), 400, words)


def test_oversized_body_is_413(stack):
    raw = json.dumps({"name": "python3", "pad": "z" * 100_000}).encode()
    check_error(stack.call("POST", "/api/kernels", raw=raw), 413, "65536")


def test_body_over_the_servers_limit_is_refused_without_harm(stack):
    """Over 1 MiB the HTTP server itself refuses the body before any handler sees it."""
    host, port = urllib.parse.urlsplit(stack.url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /api/kernels HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: token " + stack.token.encode() + b"\r\n"
            b"Content-Length: " + str(8 << 20).encode() + b"\r\n\r\n"
        )
        head = conn.recv(1024)
    assert head.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413")), head
    assert stack.call("GET", "/api/kernels").status == 200


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": 7}, "name must be a kernelspec name"),
        ({"name": ["python3"]}, "name must be a kernelspec name"),
        ({"name": "python3", "env": "KERNEL_X=1"}, "env must be a JSON object"),
        ({"name": "python3", "env": ["KERNEL_X"]}, "env must be a JSON object"),
        ({"name": "python3", "env": {"KERNEL_X": 1}}, "env value of KERNEL_X must be a string"),
        ({"name": "python3", "env": {"KERNEL_X": None}}, "env value of KERNEL_X"),
        ({"name": "python3", "env": {"KERNEL_X": {"a": "b"}}}, "env value of KERNEL_X"),
        ({"name": "python3", "env": {"KERNEL_X": "a\u0000b"}}, "no NUL or newline"),
        ({"name": "python3", "env": {"KERNEL_X": "a\nb"}}, "no NUL or newline"),
        ({"name": "python3", "env": {"KERNEL_X": "x" * 4097}}, "at most 4096 characters"),
        ({"name": "python3", "env": {"BAD KEY": "1"}}, "not a valid variable name"),
        ({"name": "python3", "env": {"": "1"}}, "not a valid variable name"),
        ({"name": "python3", "env": {"1ABC": "1"}}, "not a valid variable name"),
        ({"name": "python3", "env": {"A=B": "1"}}, "not a valid variable name"),
        ({"name": "python3", "env": {f"KERNEL_{i}": "1" for i in range(300)}}, "at most 256"),
    ],
)
def test_bad_names_and_env_are_400(stack, body, words):
    check_error(post(stack, body), 400, words)


def test_longest_allowed_env_value_is_accepted(stack):
    model = stack.create(name="python3", env={"KERNEL_NOTE": "x" * 4096})
    try:
        code = "import os; print(len(os.environ['KERNEL_NOTE']))"
        out = asyncio.run(run_code(stack.url, stack.token, model["id"], code))
        assert out.strip() == "4096"
    finally:
        assert stack.call("DELETE", f"/api/kernels/{model['id']}").status == 204


# -- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["python4", "python3-gpu", "R", "python3-gpu-H100-x1"])
def test_unknown_kernelspec_is_404_naming_what_exists(stack, name):
    check_error(
        post(stack, {"name": name}), 404, repr(name), "python3-gpu-h100-x1", "python3-gpu-a10g-x1"
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": "python3-gpu-h100-x1", "env": {"KERNEL_GPU_COUNT": "9"}}, ("from 0 to 8",)),
        ({"name": "python3-gpu-h100-x1", "env": {"KERNEL_GPU_COUNT": "-1"}}, ("from 0 to 8",)),
        ({"name": "python3-gpu-h100-x1", "env": {"KERNEL_GPU_COUNT": "two"}}, ("from 0 to 8",)),
        ({"name": "python3-gpu-h100-x1", "env": {"KERNEL_GPU_COUNT": "1.5"}}, ("from 0 to 8",)),
        ({"name": "python3-gpu-h100-x1", "env": {"KERNEL_GPU_COUNT": ""}}, ("from 0 to 8",)),
        ({"name": "python3", "env": {"KERNEL_GPU_TYPE": ""}}, ("GPU type such as",)),
        ({"name": "python3", "env": {"KERNEL_GPU_TYPE": "TPU"}}, ("no TPU GPU", "H100 x2",
                                                                   "A10G x1")),
        ({"name": "python3-gpu-b200-x1"}, ("no B200 GPU", "H100 x2", "A10G x1")),
        ({"name": "python3-gpu-h100-x4"}, ("no host has more than 2", "H100 x2")),
        ({"name": "python3-gpu-a10g-x2"}, ("no host has more than 1", "A10G x1")),
        ({"name": "python3-gpu-h100-x1", "env": {"KERNEL_GPU_COUNT": "3"}},
         ("no host has more than 2",)),
    ],
)  # fmt: skip
def test_bad_gpu_shapes_are_400_naming_what_is_allowed(stack, body, words):
    check_error(post(stack, body), 400, *words)


def test_unicode_digit_gpu_count_is_400(stack):
    body = {"name": "python3-gpu-h100-x1", "env": {"KERNEL_GPU_COUNT": "\u00b2"}}
    check_error(post(stack, body), 400, "from 0 to 8")


# -- identity ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "token"),
    [
        ("GET", "/api/kernels", ""),
        ("GET", "/api/kernels", "x" * 5000),
        ("POST", "/api/kernels", "not-a-real-token"),
        ("GET", "/api/kernelspecs", ""),
        ("GET", f"/api/kernels/{MISSING}", "not-a-real-token"),
        ("DELETE", f"/api/kernels/{MISSING}", ""),
        ("POST", f"/api/kernels/{MISSING}/restart", "not-a-real-token"),
        ("GET", "/api/gpus", ""),
    ],
)
def test_missing_or_wrong_token_is_401(stack, method, path, token):
    reply = stack.call(method, path, {"name": "python3"} if method == "POST" else None, token=token)
    check_error(reply, 401, "token")


@pytest.mark.parametrize("token", ["", "not-a-real-token"])
def test_websocket_without_a_good_token_is_401(stack, token):
    model = stack.create(name="python3")
    try:
        with pytest.raises(HTTPClientError) as refused:
            asyncio.run(KernelSocket.open(stack.url, token, model["id"]))
        assert refused.value.code == 401
        assert refused.value.response is not None
        assert "token" in json.loads(refused.value.response.body)["message"]
    finally:
        assert stack.call("DELETE", f"/api/kernels/{model['id']}").status == 204


def test_plain_get_on_the_websocket_endpoint_is_json(stack):
    model = stack.create(name="python3")
    try:
        check_error(stack.call("GET", f"/api/kernels/{model['id']}/channels"), 400, "websocket")
    finally:
        assert stack.call("DELETE", f"/api/kernels/{model['id']}").status == 204


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/admin/tenants", None),
        ("POST", "/api/admin/tenants", {"name": "sneaky"}),
        ("DELETE", "/api/admin/tenants/demo", None),
        ("POST", "/api/admin/tokens", {"tenant": "demo"}),
        ("GET", "/api/hosts", None),
    ],
)
def test_admin_endpoints_refuse_a_tenant_token(stack, method, path, body):
    check_error(stack.call(method, path, body), 401, "admin token")
    check_error(stack.call(method, path, body, token=""), 401, "admin token")


@pytest.mark.parametrize(
    "name", ["", "Upper", "1abc", "-abc", "a" * 25, "a b", "a_b", "a/b", "é", "a\nb", 7, None]
)
def test_bad_tenant_names_are_400(stack, name):
    reply = stack.call("POST", "/api/admin/tenants", {"name": name}, token=stack.admin_token)
    check_error(reply, 400, "name")


@pytest.mark.parametrize(
    "caps", [{"max_gpus": -1}, {"max_gpus": "2"}, {"max_kernels": 1.5}, {"max_kernels": True}]
)
def test_bad_caps_are_400(stack, caps):
    body = {"name": "capped-badly", **caps}
    reply = stack.call("POST", "/api/admin/tenants", body, token=stack.admin_token)
    check_error(reply, 400, next(iter(caps)))


def test_duplicate_tenant_is_409(stack):
    stack.tenant("twice")
    reply = stack.call("POST", "/api/admin/tenants", {"name": "twice"}, token=stack.admin_token)
    check_error(reply, 409, "twice", "already exists")


def test_unknown_tenant_on_admin_endpoints_is_404(stack):
    admin = stack.admin_token
    check_error(stack.call("DELETE", "/api/admin/tenants/nobody", token=admin), 404, "nobody")
    check_error(
        stack.call("POST", "/api/admin/tokens", {"tenant": "nobody"}, token=admin), 404, "nobody"
    )


# -- caps --------------------------------------------------------------------------------------


def test_kernel_cap_is_403_with_the_numbers(stack):
    token = stack.tenant("one-kernel", max_kernels=1)
    first = post(stack, {"name": "python3"}, token=token)
    assert first.status == 201, first.body
    try:
        check_error(post(stack, {"name": "python3"}, token=token), 403, "1 kernels", "has 1")
    finally:
        assert stack.call("DELETE", f"/api/kernels/{first.body['id']}", token=token).status == 204
    # Room again once the first is gone.
    again = post(stack, {"name": "python3"}, token=token)
    assert again.status == 201, again.body
    stack.call("DELETE", f"/api/kernels/{again.body['id']}", token=token)


def test_gpu_cap_is_403_with_the_numbers(stack):
    token = stack.tenant("one-gpu", max_gpus=1)
    check_error(
        post(stack, {"name": "python3-gpu-h100-x2"}, token=token), 403, "1 GPUs", "asked for 2"
    )
    first = post(stack, {"name": "python3-gpu-a10g-x1"}, token=token)
    assert first.status == 201, first.body
    try:
        check_error(
            post(stack, {"name": "python3-gpu-h100-x1"}, token=token), 403, "1 GPUs",
            "holds or waits for 1", "asked for 1",
        )  # fmt: skip
        cpu = post(stack, {"name": "python3"}, token=token)  # CPU kernels hold no GPU
        assert cpu.status == 201, cpu.body
        stack.call("DELETE", f"/api/kernels/{cpu.body['id']}", token=token)
    finally:
        stack.call("DELETE", f"/api/kernels/{first.body['id']}", token=token)


# -- endpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/nothing", 404),
        ("POST", "/api/kernels/not-a-uuid/restart", 404),
        ("POST", f"/api/kernels/{MISSING}/explode", 404),
        ("GET", "/api/kernels/" + "a" * 3000, 404),
        ("PUT", "/api/kernels", 405),
        ("DELETE", "/api/kernelspecs", 405),
    ],
)
def test_unknown_endpoints_and_methods_are_json(stack, method, path, status):
    reply = stack.call(method, path, {} if method in ("POST", "PUT") else None)
    check_error(reply, status)
    if status == 405:
        assert method in reply.body["message"]


def test_gateway_still_serves_after_all_of_it(stack):
    specs = stack.call("GET", "/api/kernelspecs")
    assert specs.status == 200
    for entry in specs.body["kernelspecs"].values():
        assert entry["spec"]["metadata"]["gpupool"]["queue"] == 0
    h100 = specs.body["kernelspecs"]["python3-gpu-h100-x2"]["spec"]["metadata"]["gpupool"]
    assert h100["free"] == 2, "a refused request must not hold a GPU"
    assert stack.call("GET", "/api/kernels").body == []
    model = stack.create(name="python3-gpu-h100-x1")
    try:
        out = asyncio.run(run_code(stack.url, stack.token, model["id"], "print('still here')"))
        assert out == "still here\n"
    finally:
        assert stack.call("DELETE", f"/api/kernels/{model['id']}").status == 204


def test_too_many_wrong_tokens_from_one_address_get_429(tmp_path):
    gateway = start_gateway(tmp_path, "--auth-failures-per-minute", "3")
    try:
        token = gateway.tenant("limited")
        for _ in range(5):  # no token at all is not a guess: not counted
            assert gateway.call("GET", "/api/kernels", token="").status == 401
        for wrong in ("wrong-1", "wrong-2", "wrong-3"):
            assert gateway.call("GET", "/api/kernels", token=wrong).status == 401
        refused = gateway.call("GET", "/api/kernels", token="wrong-4")
        check_error(refused, 429, "too many requests with a wrong token from 127.0.0.1")
        assert "over 3 a minute" in refused.body["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        wrong_admin = gateway.call("GET", "/api/admin/tenants", token="wrong-5")
        check_error(wrong_admin, 429, "too many requests")
        with pytest.raises(HTTPClientError) as socket_refused:
            asyncio.run(KernelSocket.open(gateway.url, "wrong-6", MISSING))
        assert socket_refused.value.code == 429
        # A right token is always served: a stale script cannot lock out others on its address.
        assert gateway.call("GET", "/api/kernels", token=token).status == 200
        assert gateway.call("GET", "/api/admin/tenants", token=gateway.admin_token).status == 200
        # Hosts are never counted or blocked.
        host = gateway.call("POST", "/api/hosts/register", {}, token="wrong-join")
        check_error(host, 401, "join token")
    finally:
        gateway.stop()


@pytest.mark.parametrize("value", ["-1", "lots", "2000000"])
def test_bad_auth_limit_option_is_refused(tmp_path, value):
    done = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "gateway", "--port", "0",
         "--state-dir", str(tmp_path), f"--auth-failures-per-minute={value}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert re.search(r"auth.failures.per.minute", done.stderr + done.stdout), done.stderr


def test_the_wait_ends_a_minute_after_the_failures(monkeypatch):
    from kernel_gateway import auth_limit

    now = [1000.0]
    monkeypatch.setattr(auth_limit.time, "monotonic", lambda: now[0])
    limit = auth_limit.FailedAuth(per_minute=2)
    limit.failed("10.0.0.1")
    now[0] += 30
    limit.failed("10.0.0.1")
    assert limit.wait_for("10.0.0.1") == pytest.approx(30.0)  # the first one ages out at 1060
    assert limit.wait_for("10.0.0.2") == 0.0  # another address is not affected
    now[0] += 30.5
    assert limit.wait_for("10.0.0.1") == 0.0
    monkeypatch.setattr(auth_limit, "MAX_ADDRESSES", 3)
    for n in range(5):
        limit.failed(f"10.0.1.{n}")
    assert len(limit._failures) == 3  # a scan of many addresses cannot grow it without bound
    assert auth_limit.FailedAuth(per_minute=0).wait_for("10.0.0.1") == 0.0


def test_a_message_that_is_not_v1_is_refused_through_the_gateway(stack):
    """The host's refusal reaches the client, in its words; the kernel goes on."""
    model = stack.create(name="python3")
    try:

        async def send() -> tuple[Any, Any]:
            sock = await KernelSocket.open(stack.url, stack.token, model["id"], V1)
            return await closed_by(sock, NOT_V1_MESSAGES[0])

        code, reason = asyncio.run(send())
        assert code == 1007 and f"not a {V1} message" in reason
        assert asyncio.run(run_code(stack.url, stack.token, model["id"], "print(1)", V1)) == "1\n"
    finally:
        assert stack.call("DELETE", f"/api/kernels/{model['id']}").status == 204
