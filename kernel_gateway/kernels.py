"""Kernel sessions at the gateway: queued for a GPU, started on a host, followed until they end."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .errors import ApiError
from .metrics import START_SECONDS
from .pool import HostView, Pool
from .shapes import CPU, EXECUTION_STATE, Shape, shape_of_name
from .store import Kernel, Tenant

log = logging.getLogger(__name__)
MAX_GPUS_PER_KERNEL = 8
START_WAIT_SECONDS = 30.0  # POST /api/kernels waits this long for a free GPU's kernel to start
HOST_ENV_PREFIXES = ("KERNEL_",)
GATEWAY_ENV = ("KERNEL_GPU_TYPE", "KERNEL_GPU_COUNT", "KERNEL_IDLE_TIMEOUT", "KERNEL_WORKING_DIR")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Live:
    """What the gateway knows of a kernel beyond its row: activity and who waits for it."""

    execution_state: str = "starting"
    last_activity: float = field(default_factory=time.time)
    connections: int = 0
    held_since: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        self.last_activity = time.time()

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


def read_shape(name: str, env: dict[str, str]) -> Shape:
    shape = shape_of_name(name)
    if shape is None:
        raise ApiError(
            404, f"no kernelspec named {name[:80]!r}; GET /api/kernelspecs lists the shapes."
        )
    gpu_type = env.get("KERNEL_GPU_TYPE")
    count_text = env.get("KERNEL_GPU_COUNT")
    if gpu_type is not None:
        if not gpu_type.strip() or len(gpu_type) > 64:
            raise ApiError(400, "KERNEL_GPU_TYPE must name a GPU type such as H100.")
        shape = Shape(gpu_type.strip().upper(), shape.gpu_count or 1)
    if count_text is not None:
        if not re.fullmatch(r"[0-9]{1,2}", count_text) or int(count_text) > MAX_GPUS_PER_KERNEL:
            raise ApiError(
                400, f"KERNEL_GPU_COUNT must be a whole number from 0 to {MAX_GPUS_PER_KERNEL}."
            )
        count = int(count_text)
        shape = Shape(shape.gpu_type, count) if count and shape.gpu_type else CPU
    return shape


class GatewayKernels:
    def __init__(self, db: sessionmaker[Session], pool: Pool) -> None:
        self.db = db
        self.pool = pool
        self.live: dict[str, Live] = {}
        self.queue: list[str] = []
        self.missed: set[str] = set()  # running kernels missing from their host's last report
        self.http = AsyncHTTPClient()
        self._dispatching = asyncio.Lock()

    # -- reading ---------------------------------------------------------------------------

    def _live(self, kernel_id: str) -> Live:
        if kernel_id not in self.live:
            self.live[kernel_id] = Live()
        return self.live[kernel_id]

    def get(self, tenant: Tenant, kernel_id: str) -> Kernel:
        """The tenant's kernel, or 404 exactly as for an id that never existed."""
        with self.db() as s:
            kernel = s.get(Kernel, kernel_id)
        if kernel is None or kernel.tenant_id != tenant.id or kernel.state == "deleted":
            raise ApiError(404, f"Kernel does not exist: {kernel_id}")
        return kernel

    def model(self, kernel: Kernel) -> dict[str, Any]:
        live = self._live(kernel.id)
        held = 0.0
        if live.held_since is not None:
            held = (kernel.ended or time.time()) - live.held_since
        shape = Shape(kernel.gpu_type, kernel.gpu_count)
        gpupool: dict[str, Any] = {
            "state": kernel.state,
            "gpu_type": kernel.gpu_type,
            "gpu_count": kernel.gpu_count,
            "billed_seconds": round(held, 3),
            "cost_usd": round(held * shape.usd_per_hour / 3600, 6),
            "reason": kernel.reason,
        }
        if kernel.state == "queued":
            gpupool["queue_position"] = (
                self.queue.index(kernel.id) + 1 if kernel.id in self.queue else 1
            )
        if kernel.state == "running":
            execution_state = live.execution_state
        else:
            execution_state = EXECUTION_STATE.get(kernel.state, "unknown")
        return {
            "id": kernel.id,
            "name": kernel.name,
            "last_activity": iso(live.last_activity),
            "execution_state": execution_state,
            "connections": live.connections,
            "gpupool": gpupool,
        }

    def list_for(self, tenant: Tenant) -> list[dict[str, Any]]:
        with self.db() as s:
            rows = s.scalars(
                select(Kernel).where(
                    Kernel.tenant_id == tenant.id, Kernel.state.not_in(["deleted", "dead"])
                )
            ).all()
        return [self.model(k) for k in rows]

    def counts(self) -> dict[str, int]:
        with self.db() as s:
            rows = s.scalars(select(Kernel).where(Kernel.state.not_in(["deleted"]))).all()
        counts: dict[str, int] = {}
        for k in rows:
            counts[k.state] = counts.get(k.state, 0) + 1
        return counts

    # -- starting --------------------------------------------------------------------------

    async def create(self, tenant: Tenant, name: str, env: dict[str, str]) -> dict[str, Any]:
        shape = read_shape(name, env)
        why = self.pool.impossible(shape)
        if why:
            raise ApiError(400, why)
        self._check_caps(tenant, shape)
        kernel = Kernel(
            id=str(uuid.uuid4()), tenant_id=tenant.id, name=shape.kernel_name,
            gpu_type=shape.gpu_type, gpu_count=shape.gpu_count, state="queued",
            env={k: v for k, v in env.items() if k not in GATEWAY_ENV},
        )  # fmt: skip
        with self.db() as s:
            s.add(kernel)
            s.commit()
        live = self._live(kernel.id)
        self.queue.append(kernel.id)
        waiter = live.changed
        await self.dispatch()
        kernel = self._row(kernel.id)
        if kernel.state == "starting":
            try:
                await asyncio.wait_for(waiter.wait(), START_WAIT_SECONDS)
            except asyncio.TimeoutError:
                pass  # it goes on starting; the client sees "starting" and may connect already
            kernel = self._row(kernel.id)
        if kernel.state == "dead":
            raise ApiError(500, f"the kernel could not start: {kernel.reason}")
        return self.model(kernel)

    def _row(self, kernel_id: str) -> Kernel:
        with self.db() as s:
            kernel = s.get(Kernel, kernel_id)
        assert kernel is not None
        return kernel

    def _check_caps(self, tenant: Tenant, shape: Shape) -> None:
        with self.db() as s:
            active = s.scalars(
                select(Kernel).where(
                    Kernel.tenant_id == tenant.id, Kernel.state.not_in(["deleted", "dead"])
                )
            ).all()
        if tenant.max_kernels is not None and len(active) + 1 > tenant.max_kernels:
            raise ApiError(
                403, f"tenant {tenant.name} may have {tenant.max_kernels} kernels and has "
                f"{len(active)}; shut one down first.",
            )  # fmt: skip
        gpus = sum(k.gpu_count for k in active)
        if tenant.max_gpus is not None and gpus + shape.gpu_count > tenant.max_gpus:
            raise ApiError(
                403, f"tenant {tenant.name} may hold {tenant.max_gpus} GPUs, holds or waits for "
                f"{gpus}, and asked for {shape.gpu_count} more.",
            )  # fmt: skip

    async def dispatch(self) -> None:
        """Start queued kernels, first come first served within each GPU type."""
        async with self._dispatching:
            blocked: set[str | None] = set()
            for kernel_id in list(self.queue):
                kernel = self._row(kernel_id)
                shape = Shape(kernel.gpu_type, kernel.gpu_count)
                if shape.gpu_type in blocked:
                    continue
                host = self.pool.place(shape)
                if host is None:
                    blocked.add(shape.gpu_type)
                    continue
                self.queue.remove(kernel_id)
                host.reserved[kernel_id] = shape
                self._set(kernel_id, state="starting", host_id=host.id)
                asyncio.get_running_loop().create_task(self._start_on(host, kernel))
            for kernel_id in self.queue:
                self._live(kernel_id).notify()  # queue positions moved

    def _set(self, kernel_id: str, **values: Any) -> Kernel:
        with self.db() as s:
            kernel = s.get(Kernel, kernel_id)
            assert kernel is not None
            for key, value in values.items():
                setattr(kernel, key, value)
            s.commit()
        return kernel

    async def _start_on(self, host: HostView, kernel: Kernel) -> None:
        with self.db() as s:
            tenant = s.get(Tenant, kernel.tenant_id)
        assert tenant is not None
        body = {
            "name": "python3", "gpu_count": kernel.gpu_count, "tenant": tenant.name,
            "env": {k: v for k, v in kernel.env.items()},
        }  # fmt: skip
        if kernel.gpu_count:
            body["gpu_type"] = kernel.gpu_type
        try:
            reply = await self.host_call(host, "POST", "/api/kernels", body)
        except HTTPClientError as error:
            host.reserved.pop(kernel.id, None)
            if self._row(kernel.id).state != "starting":
                return  # shut down, or lost with its host, while the host answered
            if error.code == 409:  # our view of the host was stale: wait for the next GPU
                self._set(kernel.id, state="queued", host_id=None)
                self.queue.insert(0, kernel.id)
                self._live(kernel.id).notify()  # create() answers "queued" now, not in 30 s
                return
            self._end(kernel.id, f"host {host.name} refused to start it: {_message(error)}")
            return
        except Exception as error:
            host.reserved.pop(kernel.id, None)
            self._end(kernel.id, f"host {host.name} could not be reached: {error}")
            return
        host.reserved.pop(kernel.id, None)
        if self._row(kernel.id).state != "starting":
            # Shut down, or lost with its host, while the host started it: stop it there too,
            # or it would hold its GPUs with no one to use or bill them.
            log.info("kernel %s ended while starting; stopping it on %s", kernel.id, host.name)
            asyncio.get_running_loop().create_task(self._stop_on_host(host, str(reply["id"])))
            return
        host.held[kernel.id] = list(reply["gpupool"]["gpus"])
        live = self._live(kernel.id)
        live.held_since = time.time()
        live.execution_state = reply.get("execution_state", "idle")
        live.touch()
        self._set(kernel.id, state="running", host_kernel_id=reply["id"], gpus=host.held[kernel.id])
        START_SECONDS.observe(time.time() - kernel.created)
        live.notify()

    async def host_call(
        self, host: HostView, method: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        request = HTTPRequest(
            host.url + path,
            method=method,
            headers={"Authorization": f"token {host.token}", "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else (b"{}" if method == "POST" else None),
            request_timeout=120,
        )
        response = await self.http.fetch(request)
        return dict(json.loads(response.body)) if response.body else {}

    # -- ending ----------------------------------------------------------------------------

    def _end(
        self, kernel_id: str, reason: str, state: str = "dead", ended: float | None = None
    ) -> None:
        kernel = self._row(kernel_id)
        if kernel.state == "deleted" or (kernel.state == "dead" and state == "dead"):
            return
        if kernel.state == "dead":  # its owner shuts down a kernel that already died: keep why
            self._set(kernel_id, state=state)
            return
        for host in self.pool.hosts.values():
            host.held.pop(kernel_id, None)
            host.reserved.pop(kernel_id, None)
        if kernel_id in self.queue:
            self.queue.remove(kernel_id)
        self.missed.discard(kernel_id)
        live = self._live(kernel_id)
        if ended is None or live.held_since is None:
            ended = time.time()
        else:  # billing ends when the kernel was last seen alive, never before it started
            ended = max(ended, live.held_since)
        self._set(kernel_id, state=state, reason=reason, ended=ended)
        live.execution_state = "dead"
        live.notify()
        asyncio.get_running_loop().create_task(self.dispatch())

    async def _stop_on_host(self, host: HostView, host_kernel_id: str) -> None:
        try:
            await self.host_call(host, "DELETE", f"/api/kernels/{host_kernel_id}")
        except Exception as error:  # already gone (404), or the host went away: nothing to stop
            log.info("could not stop kernel %s on %s: %s", host_kernel_id, host.name, error)

    async def delete(self, tenant: Tenant, kernel_id: str) -> None:
        kernel = self.get(tenant, kernel_id)
        host = self.pool.hosts.get(kernel.host_id or "")
        if kernel.state == "running" and host is not None and kernel.host_kernel_id:
            try:
                await self.host_call(host, "DELETE", f"/api/kernels/{kernel.host_kernel_id}")
            except HTTPClientError as error:
                if error.code != 404:
                    raise ApiError(
                        502, f"host {host.name} could not stop it: {_message(error)}"
                    ) from None
            except OSError as error:
                log.warning(
                    "host %s unreachable while deleting %s: %s", host.name, kernel_id, error
                )
        self._end(kernel_id, "shut down by its owner", state="deleted")

    async def action(self, tenant: Tenant, kernel_id: str, action: str) -> dict[str, Any]:
        kernel = self.get(tenant, kernel_id)
        if kernel.state == "dead":
            raise ApiError(409, f"kernel {kernel_id} is dead ({kernel.reason}); start a new one.")
        host = self.pool.hosts.get(kernel.host_id or "")
        if kernel.state == "running" and host is not None:
            try:
                await self.host_call(host, "POST", f"/api/kernels/{kernel.host_kernel_id}/{action}")
            except HTTPClientError as error:
                raise ApiError(
                    502, f"host {host.name} could not {action} it: {_message(error)}"
                ) from None
        return self.model(self._row(kernel_id))

    # -- hosts -----------------------------------------------------------------------------

    def host_reported(self, host: HostView, kernels: list[dict[str, Any]]) -> None:
        """Take in a host's view of its kernels: activity, and deaths."""
        by_host_id = {k["id"]: k for k in kernels}
        with self.db() as s:
            ours = s.scalars(
                select(Kernel).where(Kernel.host_id == host.id, Kernel.state == "running")
            ).all()
        for kernel in ours:
            reported = by_host_id.get(kernel.host_kernel_id or "")
            if reported is None and kernel.id not in self.missed:
                # A report composed just before the host started this kernel can arrive after
                # the host's answer to the start: only a second report in a row is proof.
                self.missed.add(kernel.id)
                continue
            if reported is None or reported.get("execution_state") == "dead":
                why = reported.get("reason") if reported else "the host no longer runs it"
                self._end(kernel.id, f"on host {host.name}: {why}")
                continue
            self.missed.discard(kernel.id)
            live = self._live(kernel.id)
            host.held.setdefault(kernel.id, list(kernel.gpus))
            if live.held_since is None:
                live.held_since = kernel.created
            live.execution_state = reported["execution_state"]
            stamp = datetime.strptime(reported["last_activity"], "%Y-%m-%dT%H:%M:%S.%fZ")
            live.last_activity = max(
                live.last_activity, stamp.replace(tzinfo=timezone.utc).timestamp()
            )

    def host_lost(self, host: HostView) -> None:
        with self.db() as s:
            ours = s.scalars(
                select(Kernel).where(
                    Kernel.host_id == host.id, Kernel.state.in_(["running", "starting"])
                )
            ).all()
        seen = iso(host.last_seen)
        for kernel in ours:
            self._end(
                kernel.id,
                f"its host {host.name} stopped answering (last heard {seen})",
                ended=host.last_seen,
            )

    def reattach(self, host: HostView, kernels: list[dict[str, Any]]) -> None:
        """A host that comes back reports its kernels: those lost with it run again."""
        running = {k["id"]: k for k in kernels if k.get("execution_state") != "dead"}
        with self.db() as s:
            lost = s.scalars(
                select(Kernel).where(Kernel.host_id == host.id, Kernel.state == "dead")
            ).all()
        for kernel in lost:
            if kernel.host_kernel_id in running and "stopped answering" in kernel.reason:
                self._set(kernel.id, state="running", reason="", ended=None)
                host.held[kernel.id] = list(kernel.gpus)
                self._live(kernel.id).notify()
        # Kernels shut down (or ended for good) while the host was away still run there: stop
        # them, or their GPUs stay taken with nobody to use or bill them.
        with self.db() as s:
            over = s.scalars(
                select(Kernel).where(
                    Kernel.host_id == host.id,
                    Kernel.state.in_(["deleted", "dead"]),
                    Kernel.host_kernel_id.in_(list(running)),
                )
            ).all()
        for kernel in over:
            log.info("stopping kernel %s on %s: it ended while the host was away", kernel.id,
                     host.name)  # fmt: skip
            stop = self._stop_on_host(host, str(kernel.host_kernel_id))
            asyncio.get_running_loop().create_task(stop)


def _message(error: HTTPClientError) -> str:
    try:
        return str(json.loads(error.response.body)["message"]) if error.response else str(error)
    except (ValueError, KeyError, TypeError):
        return str(error)
