"""The agent's REST API: jupyter_server's kernel handlers, extended for GPUs and tenants.

Loaded through `ServerApp.extra_services`, so these routes come before jupyter_server's own."""

from __future__ import annotations

import json
from typing import Any, cast

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.services.kernels import handlers as stock
from jupyter_server.utils import url_escape, url_path_join
from tornado import web

from . import checkpoints
from .allocator import AllocationError
from .kernel_request import RequestError, parse_kernel_request
from .kernels import HostKernelManager
from .websocket import HostKernelWebsocketHandler

KERNEL_ID = stock._kernel_id_regex
ACTION = stock._kernel_action_regex


class HostHandlerMixin:
    settings: dict[str, Any]

    @property
    def host_kernels(self) -> HostKernelManager:
        return cast(HostKernelManager, self.settings["kernel_manager"])


class KernelsHandler(HostHandlerMixin, stock.MainKernelHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Start a kernel pinned to GPUs: body {name, env, gpu_type, gpu_count, gpus, shared,
        tenant}."""
        km = self.host_kernels
        try:
            request = parse_kernel_request(self.request.body)
            kernel_id = await km.start_for(request)
        except RequestError as error:
            raise web.HTTPError(error.status, str(error)) from None
        except AllocationError as error:
            raise web.HTTPError(error.status, error.message) from None
        model = km.kernel_model(kernel_id)
        self.set_header(
            "Location", url_path_join(self.base_url, "api/kernels", url_escape(kernel_id))
        )
        self.set_status(201)
        self.finish(json.dumps(model))


class KernelHandler(HostHandlerMixin, stock.KernelHandler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        self.host_kernels.require_visible(kernel_id)
        await super().get(kernel_id)  # type: ignore[misc]

    @web.authenticated
    @authorized
    async def delete(self, kernel_id: str) -> None:
        self.host_kernels.require_visible(kernel_id)
        await super().delete(kernel_id)  # type: ignore[misc]


class KernelActionHandler(HostHandlerMixin, stock.KernelActionHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str, action: str) -> None:
        self.host_kernels.require_visible(kernel_id, alive=True)
        await super().post(kernel_id, action)  # type: ignore[misc]


class CheckpointHandler(HostHandlerMixin, APIHandler):
    auth_resource = "kernels"

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        """Save the kernel's user namespace to a file in its tenant's folder, from inside the
        kernel: {path, bytes, saved, not_saved, seconds}."""
        self.host_kernels.require_visible(kernel_id, alive=True)
        checkpoints.parse_body(self.request.body)
        self.finish(json.dumps(await checkpoints.checkpoint(self.host_kernels, kernel_id)))


class RestoreHandler(HostHandlerMixin, APIHandler):
    auth_resource = "kernels"

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        """Load a checkpoint from the kernel's tenant folder into its user namespace, from inside
        the kernel: body {path}; answers {restored, failed, seconds}."""
        km = self.host_kernels
        km.require_visible(kernel_id, alive=True)
        body = checkpoints.parse_body(self.request.body, ("path",))
        path = checkpoints.restore_path(km, kernel_id, body.get("path"))
        self.finish(json.dumps(await checkpoints.restore(km, kernel_id, path)))


class CheckpointFileHandler(HostHandlerMixin, APIHandler):
    auth_resource = "kernels"

    @web.authenticated
    @authorized
    async def delete(self, tenant: str, name: str) -> None:
        """Delete a checkpoint no kernel will resume from (its kernel was shut down while
        suspended): 204, or 404 when there is no such file."""
        if not checkpoints.discard(self.host_kernels, tenant, name):
            raise web.HTTPError(404, f"tenant {tenant} has no checkpoint {name}.")
        self.set_status(204)
        self.finish()


class GpusHandler(APIHandler):
    auth_resource = "kernels"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """This host's GPUs, live from NVML (or the fake inventory), with the kernels on each."""
        self.finish(json.dumps(self.settings["gpupool_status"].gpus()))


class HostHandler(APIHandler):
    auth_resource = "kernels"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Everything a heartbeat carries: the host, its GPUs and each kernel's activity."""
        self.finish(json.dumps(self.settings["gpupool_status"].heartbeat()))


default_handlers = [
    (r"/api/kernels", KernelsHandler),
    (rf"/api/kernels/{KERNEL_ID}", KernelHandler),
    (rf"/api/kernels/{KERNEL_ID}/{ACTION}", KernelActionHandler),
    (rf"/api/kernels/{KERNEL_ID}/checkpoint", CheckpointHandler),
    (rf"/api/kernels/{KERNEL_ID}/restore", RestoreHandler),
    (rf"/api/kernels/{KERNEL_ID}/channels", HostKernelWebsocketHandler),
    (r"/api/checkpoints/([^/]{1,64})/([^/]{1,64})", CheckpointFileHandler),
    (r"/api/gpus", GpusHandler),
    (r"/api/host", HostHandler),
]
