"""The `%%gpu` side's REST client (jupyter_ext/gateway_api.py) against a small HTTP server on
loopback: GETs keep one connection, a connection the server closed while idle is replaced
without an error, errors are GatewayErrors that say what happened, a redirect is followed.
And the footer's clock: after one report, a cell's start is read from this machine's clock."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gpupool.wire import iso, parse_iso
from jupyter_ext import magics
from jupyter_ext.errors import GatewayError
from jupyter_ext.gateway_api import GatewayApi


class Server(ThreadingHTTPServer):
    daemon_threads = True
    peers: list[int]  # the client port of each request
    close_after: bool = False  # drop the connection after each answer, saying nothing


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        server: Server = self.server  # type: ignore[assignment]
        server.peers.append(self.client_address[1])
        if self.headers.get("Authorization") != "token T":
            self.answer(401, {"message": "this token is unknown or revoked"})
        elif self.path == "/moved":
            self.send_response(307)
            self.send_header("Location", "/api/usage")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.split("?")[0] == "/api/usage":
            self.answer(200, {"now": iso(time.time()), "total": {}})
        else:
            self.answer(404, {"message": f"no such endpoint: {self.path}"})
        if server.close_after:
            self.close_connection = True

    def answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.peers = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_gets_keep_one_connection(server: Server) -> None:
    api = GatewayApi(url(server), "T")
    for _ in range(5):
        assert "now" in api.call("GET", "/api/usage")
    assert len(server.peers) == 5 and len(set(server.peers)) == 1, server.peers


def test_a_connection_closed_while_idle_is_replaced(server: Server) -> None:
    server.close_after = True  # as a gateway that ends idle connections
    api = GatewayApi(url(server), "T")
    for _ in range(3):
        assert "now" in api.call("GET", "/api/usage", timeout=5)
    assert len(set(server.peers)) == 3, server.peers


def test_errors_say_what_happened(server: Server) -> None:
    with pytest.raises(GatewayError) as refused:
        GatewayApi(url(server), "wrong").call("GET", "/api/usage")
    assert refused.value.status == 401 and "unknown or revoked" in str(refused.value)
    with pytest.raises(GatewayError) as missing:
        GatewayApi(url(server), "T").call("GET", "/api/nothing")
    assert missing.value.status == 404 and "/api/nothing" in str(missing.value)
    closed = url(server)
    server.shutdown()
    server.server_close()
    with pytest.raises(GatewayError) as gone:
        GatewayApi(closed, "T").call("GET", "/api/usage", timeout=5)
    assert gone.value.status == 0 and f"cannot reach the gateway at {closed}" in str(gone.value)


def test_a_redirect_is_followed(server: Server) -> None:
    assert "now" in GatewayApi(url(server), "T").call("GET", "/moved")


class FakeCompanion:
    def __init__(self, api: GatewayApi) -> None:
        self.api = api
        self.kernel_id = "k"
        self.clock_offset: float | None = None
        self.last_until: str | None = None


def test_a_cells_start_is_read_from_the_clock_after_one_report(server: Server) -> None:
    companion: Any = FakeCompanion(GatewayApi(url(server), "T"))
    assert magics.gateway_clock(companion)  # no report yet: asked of the gateway
    assert len(server.peers) == 1
    companion.clock_offset, companion.last_until = 100.0, iso(time.time() + 100.0)
    estimate = parse_iso(magics.gateway_clock(companion))
    assert len(server.peers) == 1  # not asked
    assert abs(estimate - (time.time() + 100.0)) < 1.0
    # Never before the last report's time, whatever the offset says.
    companion.clock_offset = -3600.0
    assert magics.gateway_clock(companion) == companion.last_until
