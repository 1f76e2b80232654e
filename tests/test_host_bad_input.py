"""Every malformed, oversized, out-of-range or unauthorized request gets a clear 4xx JSON error,
and the agent keeps serving."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from kernel_ws import NOT_V1_MESSAGES, V1, KernelSocket, closed_by, run_code
from tornado.httpclient import HTTPClientError

MISSING = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"gpus": ["GPU-00000000-0000-0000-0000-000000000000"]}, 400, "unknown GPU UUID"),
        ({"gpu_type": "H100", "gpu_count": 3}, 400, "3 GPUs of H100 asked for"),
        ({"gpu_type": "B200"}, 400, "this host has no B200 GPU; it has H100 x2, A10G x1"),
        ({"gpu_count": -1}, 400, "from 0 to 8"),
        ({"gpu_count": 9}, 400, "from 0 to 8"),
        ({"gpu_count": "many"}, 400, "whole number"),
        ({"gpu_count": True}, 400, "whole number"),
        ({"gpu_type": ""}, 400, "GPU type such as"),
        ({"gpus": "GPU-1"}, 400, "list of GPU UUID"),
        ({"gpus": ["GPU-1", "GPU-1"]}, 400, "each GPU once"),
        ({"name": "python2"}, 400, "no kernel named 'python2'"),
        ({"name": 7}, 400, "name must be a string"),
        ({"env": "A=1"}, 400, "env must be a JSON object"),
        ({"env": {"A": 1}}, 400, "env value of A must be a string"),
        ({"env": {"A": "x\ny"}}, 400, "no NUL or newline"),
        ({"env": {"A": "x\u0000y"}}, 400, "no NUL or newline"),
        ({"env": {"A": "x" * 4097}}, 400, "at most 4096 characters"),
        ({"env": {"BAD KEY": "1"}}, 400, "not a valid variable name"),
        ({"env": {f"K{i}": "1" for i in range(300)}}, 400, "at most 256"),
        ({"tenant": "Robert'); DROP"}, 400, "not a valid name"),
        ({"shared": "yes"}, 400, "shared must be true or false"),
        ([1, 2], 400, "must be a JSON object"),
    ],
)
def test_bad_kernel_requests(host, body, status, words):
    reply = host.call("POST", "/api/kernels", body)
    assert reply.status == status, reply.body
    assert words in reply.body["message"]


def test_bad_json_and_oversized_bodies(host):
    broken = host.call("POST", "/api/kernels", raw=b'{"name": "python3",')
    assert broken.status == 400 and "not valid JSON" in broken.body["message"]
    huge = json.dumps({"name": "python3", "env": {"X": "y" * 4000}, "pad": "z" * 100_000}).encode()
    oversized = host.call("POST", "/api/kernels", raw=huge)
    assert oversized.status == 413 and "at most 65536" in oversized.body["message"]


def test_more_gpus_than_free_is_a_conflict_not_a_failure(host):
    held = host.create(gpu_type="A10G")
    reply = host.call("POST", "/api/kernels", {"gpu_type": "A10G"})
    assert reply.status == 409
    assert reply.body["message"].startswith("1 x A10G asked for, but only 0 free on this host")
    host.call("DELETE", f"/api/kernels/{held['id']}")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/api/kernels/{MISSING}"),
        ("DELETE", f"/api/kernels/{MISSING}"),
        ("POST", f"/api/kernels/{MISSING}/interrupt"),
        ("POST", f"/api/kernels/{MISSING}/restart"),
    ],
)
def test_unknown_kernel_ids_are_404(host, method, path):
    reply = host.call(method, path, {} if method == "POST" else None)
    assert reply.status == 404 and MISSING in reply.body["message"]


def test_websocket_to_a_kernel_that_does_not_exist(host):
    with pytest.raises(HTTPClientError) as refused:
        asyncio.run(KernelSocket.open(host.url, host.token, MISSING))
    assert refused.value.code == 404
    assert b"Kernel does not exist" in refused.value.response.body


def test_agent_still_serves_after_all_of_it(host):
    model = host.create(gpu_type="H100")
    assert host.call("GET", f"/api/kernels/{model['id']}").status == 200
    assert host.call("DELETE", f"/api/kernels/{model['id']}").status == 204


@pytest.mark.parametrize("payload", NOT_V1_MESSAGES)
def test_a_message_that_is_not_v1_closes_that_websocket_only(host, payload):
    kernel_id = host.create(gpu_type="H100")["id"]

    async def send() -> tuple[Any, Any]:
        return await closed_by(
            await KernelSocket.open(host.url, host.token, kernel_id, V1), payload
        )

    code, reason = asyncio.run(send())
    assert code == 1007 and f"not a {V1} message" in reason and "nothing was sent" in reason
    # The kernel and the host are fine: a new websocket runs a cell.
    assert asyncio.run(run_code(host.url, host.token, kernel_id, "print(6 * 7)", V1)) == "42\n"
    host.call("DELETE", f"/api/kernels/{kernel_id}")
