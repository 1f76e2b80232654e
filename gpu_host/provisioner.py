"""The kernel provisioner that pins a kernel to its GPUs and runs it in its tenant's space."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from tornado import web

from .placement import KernelPlacement
from .tenants import CannotRunKernels, check_can_run_kernels

# Agent secrets and settings that must never reach a tenant's kernel.
HIDDEN_ENV_PREFIXES = ("GPUPOOL_HOST_", "GPUPOOL_JOIN_", "JUPYTER_TOKEN", "JPY_API_TOKEN")
PINNED_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


def kernel_env(placement: KernelPlacement, requested: dict[str, str]) -> dict[str, str]:
    """The environment of a kernel: the agent's own, less its secrets, plus what the client
    asked for, with the GPU pinning last so that nothing can override it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(HIDDEN_ENV_PREFIXES)}
    env.update(requested)
    space = placement.space
    if space.uid != os.getuid():
        env.update(HOME=str(space.workdir), USER=f"gp-{space.tenant}", LOGNAME=f"gp-{space.tenant}")
    env["GPUPOOL_TENANT"] = space.tenant
    env["GPUPOOL_KERNEL_ID"] = placement.kernel_id
    env["CUDA_VISIBLE_DEVICES"] = ",".join(placement.gpus)
    # "void" is the NVIDIA container runtime's word for "no GPU at all".
    env["NVIDIA_VISIBLE_DEVICES"] = ",".join(placement.gpus) or "void"
    return env


class GpuProvisioner(LocalProvisioner):
    """A local kernel that sees only its own GPUs, talks over IPC sockets in a folder only its
    tenant can enter, and runs as its tenant's Unix user."""

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        placement: KernelPlacement | None = kwargs.pop("gpupool", None)
        if placement is not None and self.parent is not None:
            km = self.parent
            km.transport = "ipc"
            km.cache_ports = False
            km.ip = str(placement.ipc_prefix)
            km.connection_file = str(placement.connection_file)
            kwargs["env"] = kernel_env(placement, kwargs.get("env") or {})
            kwargs["cwd"] = str(placement.space.workdir)
            if placement.space.uid != os.getuid():
                await self._check_can_run(placement, kwargs["env"])
                kwargs.update(user=placement.space.uid, group=placement.space.gid, extra_groups=[])
        launch = await super().pre_launch(**kwargs)
        if placement is not None and placement.space.uid != os.getuid():
            # The kernel reads its connection file as the tenant; nobody else may.
            os.chown(placement.connection_file, placement.space.uid, placement.space.gid)
        return launch

    async def _check_can_run(self, placement: KernelPlacement, env: dict[str, str]) -> None:
        """Refuse, with one clear line, a kernel its tenant's user could not run."""
        python = self.kernel_spec.argv[0]
        try:
            await asyncio.to_thread(check_can_run_kernels, python, placement.space, env)
        except CannotRunKernels as error:
            self.log.error("%s", error)
            raise web.HTTPError(500, str(error)) from None
