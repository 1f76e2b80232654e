"""A test-only Jupyter server extension that reads, inside the server, whether Nagle's algorithm is
off on the socket of one of its connections: `GET /nodelay-probe/<port>` (Lab's auth) answers
`{"nodelay": true|false}` for the accepted socket whose peer is 127.0.0.1:<port> (the client's
own port), 404 if the server has none. It only looks: it walks the server's open file
descriptors (`/proc/self/fd`), so it sees what jupyter_server, tornado and the extensions under
test did to the socket, whichever of them did it. Enabled by tests/test_nodelay.py through a
`jupyter_server_config.d` file, with tests/ on the server's PYTHONPATH."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join


def nodelay_of_peer(port: int) -> bool | None:
    """TCP_NODELAY of this process's TCP socket connected to 127.0.0.1:`port`, None if none."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:  # a duplicate, closed after
                if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_INET:
                    continue
                if sock.getpeername() != ("127.0.0.1", port):
                    continue
                return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return None


class ProbeHandler(APIHandler):
    @tornado.web.authenticated
    def get(self, port: str) -> None:
        nodelay = nodelay_of_peer(int(port))
        if nodelay is None:
            raise tornado.web.HTTPError(404, f"no connection from 127.0.0.1:{port}")
        self.finish(json.dumps({"nodelay": nodelay}))


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "nodelay_probe"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    base = serverapp.web_app.settings["base_url"]
    serverapp.web_app.add_handlers(
        ".*$", [(url_path_join(base, "nodelay-probe", r"(\d+)"), ProbeHandler)]
    )
