"""`gpupool-provisioner`: jupyter_client's kernel provisioner for pool kernels.

A kernelspec written by `gpupool kernelspec sync` names it, so any client that starts kernels by
kernelspec (JupyterLab, `jupyter execute`, nbclient, papermill) starts a pool kernel with it:
`POST /api/kernels` at the gateway (waiting while queued, the position in the log), then a
local bridge process (`kernel_bridge.py`) on the connection file's ports, relaying to the
kernel's websocket. jupyter_client's `LocalProvisioner` runs that process (ports, connection
file with its key, poll, wait, signals); this class adds the gateway:

- interrupt (SIGINT) is `POST /api/kernels/{id}/interrupt`;
- a restart ends the bridge, `POST /api/kernels/{id}/restart` (a kernel gone or dead by then is
  started anew) and starts a bridge again on the same ports;
- shutdown ends the bridge, then `DELETE /api/kernels/{id}`;
- poll and wait are the bridge's: it exits when the pool kernel is dead or gone.

The gateway's URL and the token come from `credentials.resolve` and reach the bridge in its
environment, never on a command line, in the kernelspec or in the connection file."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Bool, Float, Unicode

from . import credentials
from .errors import GatewayError
from .gateway_api import TOKEN_ENV, URL_ENV, GatewayApi
from .kernel_bridge import wait_until_running

PASSED_ENV = ("KERNEL_IDLE_TIMEOUT",)  # what a client's environment may ask of the pool kernel


class GpupoolProvisioner(LocalProvisioner):
    kernel_name = Unicode("", config=True, help="The pool's kernelspec, e.g. python3-gpu-h100-x1")
    queue_timeout = Float(
        900.0, config=True, help="Seconds to wait for a GPU while queued before giving up"
    )
    wait_for_gpu = Bool(
        True,
        config=True,
        help="Wait in the kernel's start while it is queued (what headless clients such as "
        "`jupyter execute` need). The Lab server extension turns it off: the start returns at "
        "once, so Lab shows the kernel as queued, and the bridge holds messages until it runs.",
    )

    gateway_kernel_id: str = ""
    _api: GatewayApi | None = None

    def _gateway(self, env: Any = None) -> GatewayApi:
        """The gateway, as the kernel's environment (else this process's) or the login file
        names it; found once, at the first start."""
        if self._api is None:
            env = env or {}
            try:
                url, token = credentials.resolve(env.get(URL_ENV, ""), env.get(TOKEN_ENV, ""))
            except credentials.CredentialsError as error:
                raise RuntimeError(str(error)) from None
            self._api = GatewayApi(url, token)
        return self._api

    def _explain(self, error: GatewayError) -> RuntimeError:
        message = credentials.explain(error, self._gateway().url)
        if error.status == 400 and "KERNEL_IDLE_TIMEOUT" in str(error):
            message += (" The idle timeout comes from JupyterLab's Settings > GPU pool, or "
                        "KERNEL_IDLE_TIMEOUT in the environment.")  # fmt: skip
        return RuntimeError(message)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        env_in = kwargs.get("env") or os.environ
        api = self._gateway(env_in)
        name = self.kernel_name or (self.kernel_spec.metadata or {}).get("gpupool_kernel", "")
        if not name:
            raise RuntimeError("this kernelspec names no pool shape; run `gpupool kernelspec sync`")
        ask = {k: str(env_in[k]) for k in PASSED_ENV if k in env_in}
        try:
            if self.gateway_kernel_id:  # a restart: same kernel id, fresh process
                model = await asyncio.to_thread(api.kernel, self.gateway_kernel_id)
                if model is None or (model.get("gpupool") or {}).get("state") == "dead":
                    # Died (the autorestarter's case): a new pool kernel of the same shape.
                    self.log.warning("gpupool: pool kernel %s ended; starting a new one",
                                     self.gateway_kernel_id)  # fmt: skip
                    await self._forget_kernel()
                else:
                    await asyncio.to_thread(
                        api.call, "POST", f"/api/kernels/{self.gateway_kernel_id}/restart"
                    )
                    self.log.info("gpupool: restarted pool kernel %s", self.gateway_kernel_id)
            if not self.gateway_kernel_id:
                model = await asyncio.to_thread(api.start_kernel, name, ask)
                self.gateway_kernel_id = str(model["id"])
                self.log.info("gpupool: pool kernel %s (%s) at %s", self.gateway_kernel_id, name,
                              api.url)  # fmt: skip
            if self.wait_for_gpu:
                await asyncio.to_thread(
                    wait_until_running,
                    api,
                    self.gateway_kernel_id,
                    self.queue_timeout,
                    lambda text: self.log.info(
                        "gpupool: kernel %s %s", self.gateway_kernel_id, text
                    ),
                )
        except GatewayError as error:
            await self._forget_kernel()
            raise self._explain(error) from None
        except TimeoutError as error:
            await self._forget_kernel()
            raise RuntimeError(str(error)) from None
        kwargs = await super().pre_launch(**kwargs)
        connection_file = self.parent.connection_file if self.parent else ""
        kwargs["cmd"] = [sys.executable, "-m", "jupyter_ext.kernel_bridge", "-f",
                         connection_file, "--kernel-id", self.gateway_kernel_id]  # fmt: skip
        if not self.wait_for_gpu:
            kwargs["cmd"] += ["--wait-seconds", str(self.queue_timeout)]
        env = dict(kwargs.get("env") or os.environ)
        env[URL_ENV], env[TOKEN_ENV] = api.url, api.token
        kwargs["env"] = env
        return kwargs

    def websocket_target(self) -> tuple[str, str, str] | None:
        """(gateway URL, token, the gateway's kernel id) once the pool kernel exists: where
        Lab's server relays a browser's websocket for it (pool_websocket.py)."""
        if not self.gateway_kernel_id or self._api is None:
            return None
        return self._api.url, self._api.token, self.gateway_kernel_id

    async def send_signal(self, signum: int) -> None:
        if signum == signal.SIGINT and self.gateway_kernel_id:
            try:
                await asyncio.to_thread(self._gateway().interrupt, self.gateway_kernel_id)
            except GatewayError as error:
                # A kernel already gone has nothing to interrupt; jupyter_client interrupts
                # before every shutdown, which must go on when the gateway is down.
                if error.status == 404 or getattr(self.parent, "shutting_down", False):
                    self.log.warning("gpupool: interrupt: %s", self._explain(error))
                else:
                    raise self._explain(error) from None
            return
        await super().send_signal(signum)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart:
            await self._forget_kernel()

    async def _forget_kernel(self) -> None:
        kernel_id, self.gateway_kernel_id = self.gateway_kernel_id, ""
        if not kernel_id:
            return
        try:
            await asyncio.to_thread(self._gateway().shutdown, kernel_id)
        except GatewayError as error:
            self.log.warning("gpupool: could not shut pool kernel %s down: %s", kernel_id, error)

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        info["gateway_kernel_id"] = self.gateway_kernel_id
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.gateway_kernel_id = str(provisioner_info.get("gateway_kernel_id", ""))
