"""Tenants at the gateway (DESIGN.md, "Clients to gateway" and "Security"): identity comes from
the token alone; another tenant's kernel id answers 404 on every endpoint and on the websocket,
exactly as an id that never existed; KERNEL_USERNAME is a label, never proof of who calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from kernel_ws import KernelSocket, run_code
from tornado.httpclient import HTTPClientError

NEVER = "00000000-0000-4000-8000-000000000000"
WARM_KERNELS = True  # the stack's host keeps them: a test takes one as another tenant


@pytest.fixture(scope="module")
def tenants(stack: Any) -> Iterator[dict[str, Any]]:
    """Tenants a and b, and a's running A10G kernel, shut down at the end."""
    a, b = stack.tenant("iso-a"), stack.tenant("iso-b")
    body = {"name": "python3-gpu-a10g-x1", "env": {"KERNEL_USERNAME": "iso-a"}}
    reply = stack.call("POST", "/api/kernels", body, token=a)
    assert reply.status == 201, reply.body
    # Left in a's namespace: gone if anything of b's ever restarts or replaces a's kernel.
    asyncio.run(run_code(stack.url, a, reply.body["id"], "mark = 'a was here'"))
    yield {"a": a, "b": b, "kernel": reply.body}
    stack.call("DELETE", f"/api/kernels/{reply.body['id']}", token=a)


def endpoints(kernel_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/api/kernels/{kernel_id}"),
        ("DELETE", f"/api/kernels/{kernel_id}"),
        ("POST", f"/api/kernels/{kernel_id}/interrupt"),
        ("POST", f"/api/kernels/{kernel_id}/restart"),
    ]


def answer(stack: Any, method: str, path: str, token: str) -> tuple[int, Any, str]:
    reply = stack.call(method, path, {} if method == "POST" else None, token=token)
    return reply.status, reply.body, reply.headers.get("Content-Type", "")


def websocket_refusal(stack: Any, token: str, kernel_id: str) -> tuple[int, Any]:
    with pytest.raises(HTTPClientError) as refused:
        asyncio.run(KernelSocket.open(stack.url, token, kernel_id))
    response = refused.value.response
    return refused.value.code, json.loads(response.body) if response is not None else None


@pytest.mark.parametrize("which", range(4), ids=["get", "delete", "interrupt", "restart"])
def test_others_kernel_is_exactly_like_one_that_never_existed(stack, tenants, which):
    kernel_id = tenants["kernel"]["id"]
    method, path = endpoints(kernel_id)[which]
    _, never_path = endpoints(NEVER)[which]
    status, body, content_type = answer(stack, method, path, tenants["b"])
    never_status, never_body, never_type = answer(stack, method, never_path, tenants["b"])
    assert status == never_status == 404, body
    assert body == {k: str(v).replace(NEVER, kernel_id) for k, v in never_body.items()}
    assert content_type == never_type
    assert "iso-a" not in json.dumps(body)


def test_others_kernel_websocket_is_404_like_one_that_never_existed(stack, tenants):
    kernel_id = tenants["kernel"]["id"]
    for protocol in (None, "v1.kernel.websocket.jupyter.org"):
        with pytest.raises(HTTPClientError) as refused:
            asyncio.run(KernelSocket.open(stack.url, tenants["b"], kernel_id, protocol))
        assert refused.value.code == 404
    code, body = websocket_refusal(stack, tenants["b"], kernel_id)
    never_code, never_body = websocket_refusal(stack, tenants["b"], NEVER)
    assert code == never_code == 404
    assert body == {k: str(v).replace(NEVER, kernel_id) for k, v in never_body.items()}


def test_listing_shows_only_the_callers_kernels(stack, tenants):
    a_ids = {k["id"] for k in stack.call("GET", "/api/kernels", token=tenants["a"]).body}
    b_ids = {k["id"] for k in stack.call("GET", "/api/kernels", token=tenants["b"]).body}
    demo_ids = {k["id"] for k in stack.call("GET", "/api/kernels").body}
    assert tenants["kernel"]["id"] in a_ids
    assert tenants["kernel"]["id"] not in b_ids | demo_ids


def test_kernel_username_is_a_label_not_an_identity(stack, tenants):
    a, b = tenants["a"], tenants["b"]
    a_kernel = tenants["kernel"]["id"]
    # Two H100s: a shape the host keeps no warm kernel for, so this one starts as b's own.
    body = {"name": "python3-gpu-h100-x2", "env": {"KERNEL_USERNAME": "iso-a"}}
    reply = stack.call("POST", "/api/kernels", body, token=b)
    assert reply.status == 201, reply.body
    b_kernel = reply.body["id"]
    try:
        # The label reaches b's kernel, but b's kernel runs as b, is listed for b only, ...
        code = "import os; print(os.environ['KERNEL_USERNAME'], os.environ['GPUPOOL_TENANT'])"
        out = asyncio.run(run_code(stack.url, b, b_kernel, code))
        assert out.split() == ["iso-a", "iso-b"]
        assert b_kernel not in {k["id"] for k in stack.call("GET", "/api/kernels", token=a).body}
        assert b_kernel in {k["id"] for k in stack.call("GET", "/api/kernels", token=b).body}
        # ... and gives b nothing of a's, nor a anything of b's.
        for method, path in endpoints(a_kernel):
            assert answer(stack, method, path, b)[0] == 404
        assert answer(stack, "GET", f"/api/kernels/{b_kernel}", a)[0] == 404
    finally:
        assert stack.call("DELETE", f"/api/kernels/{b_kernel}", token=b).status == 204


def test_revoked_tenant_gets_401_everywhere(stack, tenants):
    token = stack.tenant("iso-gone")
    reply = stack.call("POST", "/api/kernels", {"name": "python3"}, token=token)
    assert reply.status == 201, reply.body
    kernel_id = reply.body["id"]
    revoked = stack.call("DELETE", "/api/admin/tenants/iso-gone", token=stack.admin_token)
    assert revoked.status == 204, revoked.body
    everywhere = [("GET", "/api/kernels"), ("GET", "/api/kernelspecs"), ("POST", "/api/kernels")]
    for method, path in everywhere + endpoints(kernel_id):
        status, body, _ = answer(stack, method, path, token)
        assert status == 401, (method, path, body)
        assert set(body) == {"reason", "message"}
    code, body = websocket_refusal(stack, token, kernel_id)
    assert code == 401 and "revoked" in body["message"]
    # Nor does its kernel show up for anyone else.
    for other in (tenants["a"], tenants["b"], stack.token):
        assert kernel_id not in {
            k["id"] for k in stack.call("GET", "/api/kernels", token=other).body
        }


def test_owners_kernel_still_works_after_all_of_it(stack, tenants):
    a, kernel_id = tenants["a"], tenants["kernel"]["id"]
    model = stack.call("GET", f"/api/kernels/{kernel_id}", token=a)
    assert model.status == 200 and model.body["gpupool"]["state"] == "running"
    code = "import os; print(mark, len(os.environ['CUDA_VISIBLE_DEVICES'].split(',')))"
    out = asyncio.run(run_code(stack.url, a, kernel_id, code))
    assert out.split() == ["a", "was", "here", "1"]
    interrupted = stack.call("POST", f"/api/kernels/{kernel_id}/interrupt", {}, token=a)
    assert interrupted.status == 204


@pytest.mark.parametrize("env", [{}, {"GPUPOOL_TENANT": "iso-a"}], ids=["plain", "spoofed"])
def test_a_warm_kernel_runs_as_the_tenant_that_took_it(stack, tenants, env):
    b = tenants["b"]
    reply = stack.call("POST", "/api/kernels", {"name": "python3", "env": env}, token=b)
    assert reply.status == 201, reply.body
    try:
        code = "import os; print(os.environ['GPUPOOL_TENANT'], os.path.basename(os.getcwd()))"
        out = asyncio.run(run_code(stack.url, b, reply.body["id"], code))
        assert out.split() == ["iso-b", "iso-b"]
    finally:
        stack.call("DELETE", f"/api/kernels/{reply.body['id']}", token=b)
