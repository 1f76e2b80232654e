"""A test-only route for a host started with `--HostAgent.extra_services=host_probe`: what the
host still holds of its websockets, after a full garbage collection."""

from __future__ import annotations

import gc
import json
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from tornado import web

from gpu_host.websocket import HostKernelWebsocketHandler, HostWebsocketConnection


class ProbeHandler(APIHandler):
    @web.authenticated
    def get(self) -> None:
        gc.collect()
        live = gc.get_objects()
        km: Any = self.settings["kernel_manager"]
        buffers = {k: v["buffer"] for k, v in km._kernel_buffers.items()}
        self.finish(json.dumps({
            "handlers": sum(isinstance(o, HostKernelWebsocketHandler) for o in live),
            "connections": sum(isinstance(o, HostWebsocketConnection) for o in live),
            "open_sessions": len(ZMQChannelsWebsocketConnection._open_sessions),
            "open_sockets": len(ZMQChannelsWebsocketConnection._open_sockets),
            "per_kernel": dict(km.connections.kernels),
            "per_tenant": dict(km.connections.tenants),
            "kernel_connections": dict(km._kernel_connections),
            "replay_bytes": {k: sum(len(p) for _, parts in b for p in parts)
                             for k, b in buffers.items()},
        }))  # fmt: skip


default_handlers = [(r"/api/test/probe", ProbeHandler)]
