"""The client's ?session_id= on a kernel websocket: checked before the websocket opens (a 400
with a sentence, never a relay that dies and leaves the client waiting; jupyter_client needs it
ASCII), and passed to the host as one parameter, so it cannot add others (such as a token) to
the host's URL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from conftest import Gateway
from kernel_ws import KernelSocket, ws_url
from pool_processes import gateway, join, started
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

__all__ = ["started"]  # a fixture, used by name


def cpu_kernel(tmp_path: Path, started: list[Any]) -> tuple[Gateway, str]:
    gw = gateway(tmp_path, started)
    join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    return gw, str(gw.create(name="python3")["id"])


async def run_with_session(gw: Gateway, kernel_id: str, session: str, code: str) -> str:
    """Run `code` over a websocket opened with `?session_id=` + `session` (sent as written)."""
    request = HTTPRequest(
        ws_url(gw.url, kernel_id) + f"?session_id={session}",
        headers={"Authorization": f"token {gw.token}"},
    )
    sock = KernelSocket(await websocket_connect(request), None)
    try:
        out, reply = await sock.execute(code, timeout=30)
    finally:
        sock.close()
    assert reply["status"] == "ok", out
    return out


def test_a_session_id_that_is_not_text_is_refused_before_the_websocket_opens(
    tmp_path: Path, started: list[Any]
) -> None:
    gw, kernel_id = cpu_kernel(tmp_path, started)
    for bad in ("%ff%fe", "%C3%A9t%C3%A9", "a%09b", "x" * 300):
        try:
            asyncio.run(asyncio.wait_for(run_with_session(gw, kernel_id, bad, "1"), 15))
            raise AssertionError(f"session_id={bad[:20]} opened a websocket")
        except HTTPClientError as error:
            assert error.code == 400 and error.response is not None, (bad, error)
            assert "session_id" in json.loads(error.response.body)["message"], error.response.body
    # The kernel is untouched and a good session id works.
    assert asyncio.run(run_with_session(gw, kernel_id, "s-1", "print(6 * 7)")) == "42\n"


def test_a_session_id_cannot_add_parameters_to_the_hosts_url(
    tmp_path: Path, started: list[Any]
) -> None:
    gw, kernel_id = cpu_kernel(tmp_path, started)
    # Decoded, it is "x&token=abc": spliced into the host's URL as it was, the host read a
    # wrong token=abc there and refused the relay (1011).
    for session in ("x%26token%3Dabc", "a%2Fb%3Fc%23d%20e"):
        out = asyncio.run(run_with_session(gw, kernel_id, session, "print(6 * 7)"))
        assert out == "42\n", session
