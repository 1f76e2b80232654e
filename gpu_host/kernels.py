"""The agent's kernels: jupyter_server's kernel manager, plus GPUs, tenants, a warm pool and
death detection."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import deque
from functools import partial
from typing import Any, cast

import zmq
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_server._tz import utcnow
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Float, Int, List, Unicode

from gpupool.wire import Shape, iso

from .allocator import AllocationError, GpuAllocator
from .connections import Connections
from .kernel_request import KernelRequest
from .memory import MemoryTrim
from .placement import KernelPlacement
from .provisioner import kernel_env
from .tenants import TenantSpaces
from .warm_pool import WarmKey, WarmPool

KERNEL_NAME = "python3"
ENDED_KEPT = 256  # how many dead kernels stay visible, so a poller can learn how they ended
# A kernel websocket holds its TCP socket and four ZMQ sockets (shell, control, stdin, IOPub),
# each with its own connection and wake-up files: at most this many files, measured with room.
FILES_PER_WEBSOCKET = 16
ZMQ_SOCKETS_PER_WEBSOCKET = 5  # its four channels and its kernel_info handshake
FILES_KEPT = 1024  # at most, for kernels, their clients, requests and the agent itself


class HostKernelSpecManager(KernelSpecManager):
    """One kernelspec, `python3`, launched through the GPU-pinning provisioner."""

    kernel_python = Unicode(help="The Python that runs kernels.").tag(config=True)
    kernel_extensions = List(Unicode(), help="IPython extensions every kernel loads.").tag(
        config=True
    )

    def _spec(self) -> KernelSpec:
        extensions = [f"--ext={name}" for name in self.kernel_extensions]
        launch = [self.kernel_python, "-m", "ipykernel_launcher", *extensions]
        return KernelSpec(
            argv=[*launch, "-f", "{connection_file}"],
            display_name="Python 3",
            language="python",
            metadata={"kernel_provisioner": {"provisioner_name": "gpupool-gpu-provisioner"}},
            resource_dir="",
        )

    def find_kernel_specs(self) -> dict[str, str]:
        return {KERNEL_NAME: ""}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name != KERNEL_NAME:
            raise NoSuchKernel(kernel_name)
        return self._spec()

    def get_all_specs(self) -> dict[str, Any]:
        return {KERNEL_NAME: {"resource_dir": "", "spec": self._spec().to_dict()}}


SUBSCRIBE_TRIES = 200  # kernel_info requests, 5 ms apart, before giving up on the watch


class HostKernelManager(AsyncMappingKernelManager):
    """Kernels pinned to GPUs, one tenant each, with a warm pool and a watch for deaths."""

    warm_per_shape = Int(1, help="Warm kernels kept per GPU shape (and for CPU).").tag(config=True)
    poll_seconds = Float(0.5, help="How often kernel processes are checked for death.").tag(
        config=True
    )
    checkpoint_timeout = Float(
        600.0, help="Longest wait, in seconds, for a kernel to save or restore its namespace."
    ).tag(config=True)
    max_websockets_per_kernel = Int(
        128, help="Open websockets one kernel may have; more are closed with 1013."
    ).tag(config=True)
    max_websockets_per_tenant = Int(
        512, help="Open websockets one tenant's kernels on this host may have, all together."
    ).tag(config=True)
    max_websockets = Int(
        0,
        help="Open websockets on this host, all tenants together. Default (0): as many as "
        "the open-file limit and ZMQ's socket limit allow.",
    ).tag(config=True)

    max_replay_mb = Int(
        16,
        help="Largest backlog, in MiB, of a kernel's messages kept while no websocket is open "
        "to it, for the next one to replay; older messages go first.",
    ).tag(config=True)

    def attach(self, allocator: GpuAllocator, spaces: TenantSpaces, open_files: int) -> None:
        """Give the manager this machine's GPUs and tenant spaces and the agent's open-file
        limit; called once at start, before any kernel or ZMQ socket exists."""
        self.allocator = allocator
        self.spaces = spaces
        # ZMQ refuses sockets past 1023 by default ("Too many open files"): allow what the
        # open-file limit allows, up to ZMQ's own ceiling.
        sockets = max(1023, min(open_files, self.context.get(zmq.SOCKET_LIMIT)))
        self.context.set(zmq.MAX_SOCKETS, sockets)
        kept = min(FILES_KEPT, open_files // 4)
        fitting = min((open_files - kept) // FILES_PER_WEBSOCKET,
                      (sockets - kept) // ZMQ_SOCKETS_PER_WEBSOCKET)  # fmt: skip
        total = self.max_websockets or max(16, fitting)
        self.connections = Connections(
            self.max_websockets_per_kernel, self.max_websockets_per_tenant, total
        )
        self.memory = MemoryTrim()
        self.placements: dict[str, KernelPlacement] = {}
        self.released_gpu_seconds = 0.0  # held by tenants' kernels that have ended
        self.ended: dict[str, dict[str, Any]] = {}
        self._cleanups: dict[str, asyncio.Future[None]] = {}  # dead kernels' cleanups under way
        # One shell-channel client per kernel for the agent's own requests (readiness, hand-over).
        self.shells: dict[str, AsyncKernelClient] = {}
        self.warm = WarmPool(allocator, self._start_warm, self._stop, self.warm_per_shape)
        self._watch: asyncio.Task[None] | None = None

    def start_background(self) -> None:
        if self.warm_per_shape > 0 and not self.spaces.isolate:
            self.warm.want_defaults(None)
        self.warm.refill_soon()
        self._watch = asyncio.get_running_loop().create_task(self._watch_deaths())

    async def stop_background(self) -> None:
        if self._watch:
            self._watch.cancel()
        await self.warm.close()

    # -- starting --------------------------------------------------------------------------

    def pre_start_kernel(self, kernel_name: str | None, kwargs: Any) -> tuple[Any, str, str]:
        km, name, kernel_id = super().pre_start_kernel(kernel_name, kwargs)
        # jupyter_client lists a kernel as soon as its process runs, and jupyter_server gives
        # it an activity time only a turn of the event loop later: a heartbeat or kernel list
        # in between read an unset `last_activity` and failed as a whole (TraitError), so
        # that 64 starts at once made the gateway take this host for lost. Set from the start.
        km.execution_state = "starting"  # type: ignore[attr-defined]
        km.last_activity = utcnow()  # type: ignore[attr-defined]
        # jupyter_client's restarter would start a kernel that died again under the same id,
        # with none of its variables, racing the death watch: a pool kernel that dies is
        # reported dead (its GPUs freed, its billing stopped), never silently replaced.
        km.autorestart = False
        return km, name, kernel_id

    def _warm_key(self, shape: Shape, tenant: str | None) -> WarmKey:
        return WarmKey(shape, (tenant or "default") if self.spaces.isolate else None)

    async def start_for(self, request: KernelRequest) -> str:
        """Start (or take warm) a kernel for `request` and return its id."""
        self.allocator.check(request.shape, request.gpus)
        space = await self.spaces.get(request.tenant)
        key = self._warm_key(request.shape, request.tenant)
        if self.warm_per_shape > 0 and self.spaces.isolate:
            self.warm.wanted.add(key)  # this tenant uses this host: keep one ready for next time
        kernel_id = None if request.shared else self.warm.take(key, request.gpus)
        if kernel_id is None and not request.shared and self.warm.starting(key):
            await self.warm.settle()  # one is almost ready: sooner than starting another
            kernel_id = self.warm.take(key, request.gpus)
        if kernel_id is not None:
            placement = self.placements[kernel_id]
            placement.claimed = True
            placement.start = "warm"
            placement.started_at = time.time()
            placement.space = space  # the same Unix user; the owner's own folder and label
            placement.owner = request.owner
            await self._adopt(placement, request.env)
            self.log.info("kernel %s taken warm for %s", kernel_id, space.tenant)
        else:
            kernel_id = await self._start_pinned(request, claimed=True)
        self.warm.refill_soon()
        return kernel_id

    async def _start_warm(self, key: WarmKey) -> str:
        return await self._start_pinned(KernelRequest(shape=key.shape, tenant=key.tenant), False)

    async def _start_pinned(self, request: KernelRequest, claimed: bool) -> str:
        kernel_id = str(uuid.uuid4())
        try:
            gpus = self.allocator.allocate(kernel_id, request.shape, request.gpus, request.shared)
        except AllocationError:
            if not claimed:
                raise
            # GPUs held by warm kernels of another shape are given up for a real request.
            self.warm.hold_off()
            try:
                await self.warm.settle()
                evict = self.warm.holding(request.shape.gpu_type)
                if not evict:
                    raise
                await self.warm.evict(evict)
                gpus = self.allocator.allocate(
                    kernel_id, request.shape, request.gpus, request.shared
                )
            finally:
                self.warm.resume()
        space = await self.spaces.get(request.tenant)
        placement = KernelPlacement(
            kernel_id,
            gpus,
            request.shape.gpu_type if gpus else None,
            space,
            claimed,
            request.shared,
            owner=request.owner,
        )
        self.placements[kernel_id] = placement
        try:
            await self.start_kernel(
                kernel_id=kernel_id, kernel_name=KERNEL_NAME, env=request.env, gpupool=placement
            )
            # jupyter_server only waits for the process; a kernel is ready when it answers.
            client = cast(AsyncKernelClient, self.get_kernel(kernel_id).client())
            client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
            self.shells[kernel_id] = client
            await client.kernel_info(reply=True, timeout=120)
            # jupyter_server's activity watch subscribes to IOPub as the kernel starts, and a
            # ZMQ subscription takes effect a moment later: what is published before is lost to
            # it, such as the "busy" of a first cell sent at once (a warm kernel taken as soon
            # as it booted). The watch takes the kernel out of "starting" on the first status
            # it sees, so ask again until it has seen one. (Inside the try: a shutdown may
            # still come now, and is a 409 as before, not a 500.)
            kernel = self.get_kernel(kernel_id)
            for _ in range(SUBSCRIBE_TRIES):
                if kernel.execution_state != "starting":  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.005)
                await client.kernel_info(reply=True, timeout=10)
            else:
                self.log.warning("kernel %s: the activity watch heard nothing from it", kernel_id)
                kernel.execution_state = "idle"  # type: ignore[attr-defined]
        except BaseException as error:
            shut_down = kernel_id not in self  # by a DELETE that came while it started
            if not shut_down:
                await self._async_shutdown_kernel(kernel_id, now=True)
            self.allocator.release(kernel_id)
            self.placements.pop(kernel_id, None)
            if shut_down and isinstance(error, asyncio.CancelledError):
                raise web.HTTPError(
                    409, f"kernel {kernel_id} was shut down while it started; ask for a new one."
                ) from None
            raise
        return kernel_id

    async def _adopt(self, placement: KernelPlacement, requested: dict[str, str]) -> None:
        """Make a warm kernel its new owner's before the owner sees it: the environment a cold
        start would have had (tenant label, requested variables, GPU pinning) and its folder."""
        env = kernel_env(placement, requested)
        code = (
            "import os as _os; _os.environ.clear(); "
            f"_os.environ.update({json.dumps(env)}); _os.chdir({str(placement.space.workdir)!r}); "
            "del _os"
        )
        # The shell client opened at start is already connected: no handshake on this path.
        client = self.shells[placement.kernel_id]
        reply = await client.execute(code, silent=True, store_history=False, reply=True, timeout=10)
        if reply["content"]["status"] != "ok":
            raise web.HTTPError(500, "could not hand the warm kernel to its owner")
        # A restart launches the kernel again with the arguments it was started with: the
        # owner's, not the warm pool's.
        launch: dict[str, Any] = cast(Any, self.get_kernel(placement.kernel_id))._launch_args
        launch["env"] = {**(launch.get("env") or {}), **requested}
        # The reply comes before the idle status; the client must not see a busy kernel.
        self.get_kernel(placement.kernel_id).execution_state = "idle"  # type: ignore[attr-defined]

    # -- activity --------------------------------------------------------------------------

    def start_watching_activity(self, kernel_id: str) -> None:
        """jupyter_server's activity watch, with the same rules, reading only what they need
        of each IOPub message: its type, its parent's type and a status message's state. It
        verified and parsed every message whole, status messages twice, and copied every
        buffer: on a host that relays every message of every kernel, the biggest cost per
        message. Nothing is verified: the messages come from the kernel's own publisher, which
        holds the signing key anyway."""
        kernel: Any = self._kernels[kernel_id]
        kernel.reason = ""
        kernel.last_activity = utcnow()
        kernel._activity_stream = kernel.connect_iopub()

        session = kernel.session

        def record_activity(frames: list[Any]) -> None:
            try:  # after the identities: signature, header, parent, metadata, content, buffers
                _, parts = session.feed_identities(frames, copy=False)
                _signature, header, parent, _metadata, content = parts[:5]
                msg_type = json.loads(header.bytes).get("msg_type")
                parent_type = (json.loads(parent.bytes) or {}).get("msg_type")
            except (ValueError, AttributeError):
                return  # not a Jupyter message; nothing to learn from it
            if msg_type is None:
                return
            untracked = self.untracked_message_types
            if (
                msg_type not in untracked
                or parent_type not in untracked
                or kernel.execution_state == "busy"
            ):
                self.last_kernel_activity = kernel.last_activity = utcnow()
            if msg_type == "status":
                try:
                    state = json.loads(content.bytes).get("execution_state")
                except (ValueError, AttributeError):
                    return
                if state is None:
                    return
                if parent_type not in untracked:
                    kernel.execution_state = state
                elif kernel.execution_state == "starting" and state != "starting":
                    kernel.execution_state = "idle"  # as jupyter_server: started means idle

        kernel._activity_stream.on_recv(record_activity, copy=False)

    def start_buffering(self, kernel_id: str, session_key: str, channels: dict[str, Any]) -> None:
        """jupyter_server's, with a bound: while no websocket is open to a kernel, it keeps
        every message the kernel sends, for the next websocket of the same session to replay,
        in a list that only grew (a cell printing in a loop, its tab closed, filled the host).
        Here at most `max_replay_mb` are kept, the newest."""
        super().start_buffering(kernel_id, session_key, channels)
        if kernel_id not in self._kernel_buffers:
            return  # buffering is off
        kept: deque[tuple[str, list[Any]]] = deque()
        self._kernel_buffers[kernel_id]["buffer"] = kept
        most = self.max_replay_mb << 20
        size = 0

        def buffer_msg(channel: str, parts: list[Any]) -> None:
            nonlocal size
            kept.append((channel, parts))
            size += sum(len(part) for part in parts)
            while size > most and kept:
                size -= sum(len(part) for part in kept.popleft()[1])

        for channel, stream in channels.items():
            stream.on_recv(partial(buffer_msg, channel))

    # -- visibility: warm kernels are nobody's until taken --------------------------------

    def _visible(self, kernel_id: str) -> bool:
        placement = self.placements.get(kernel_id)
        return kernel_id in self and placement is not None and placement.claimed

    def require_visible(self, kernel_id: str, alive: bool = False) -> None:
        """404, exactly as for an id that never existed, unless a client may see this kernel."""
        dead = kernel_id in self.ended
        if (self._visible(kernel_id) and not dead) or (not alive and dead):
            return
        raise web.HTTPError(404, f"Kernel does not exist: {kernel_id}")

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        if kernel_id in self.ended:
            return self.ended[kernel_id]
        model: dict[str, Any] = super().kernel_model(kernel_id)
        placement = self.placements[kernel_id]
        model["gpupool"] = {
            "tenant": placement.space.tenant,
            "gpus": placement.gpus,
            "gpu_type": placement.gpu_type,
            "gpu_count": len(placement.gpus),
            "shared": placement.shared,
            "start": placement.start,
            "owner": placement.owner,
            "held_since": placement.started_at,  # Unix time its GPUs were given to this kernel
        }
        return model

    def list_kernels(self) -> list[dict[str, Any]]:
        alive = [k for k in list(self._kernels) if self._visible(k) and k not in self.ended]
        models = [self._model_or_unknown(k) for k in alive]
        return models + list(self.ended.values())

    def _model_or_unknown(self, kernel_id: str) -> dict[str, Any]:
        """A kernel's model; one that cannot be read (in a state no one foresaw) is listed as
        "unknown" rather than failing the whole list: the gateway takes a kernel missing from
        two heartbeats for gone, and a heartbeat that fails as a whole for a lost host."""
        try:
            return self.kernel_model(kernel_id)
        except Exception as error:
            self.log.warning("kernel %s: its state could not be read (%r); listed as unknown",
                             kernel_id, error)  # fmt: skip
            return {"id": kernel_id, "name": KERNEL_NAME, "execution_state": "unknown",
                    "connections": 0}  # fmt: skip

    # -- ending ----------------------------------------------------------------------------

    async def _stop(self, kernel_id: str) -> None:
        if kernel_id in self:
            await self._async_shutdown_kernel(kernel_id, now=True)

    def _release_gpus(self, kernel_id: str, when: float) -> None:
        """The kernel's hold on its GPUs ends at `when`: when they are free for another kernel
        (its process stopped, or its death seen)."""
        placement = self.placements.get(kernel_id)
        if placement is None or not placement.claimed or placement.released_at is not None:
            return
        placement.released_at = when
        self.released_gpu_seconds += max(0.0, when - placement.started_at) * len(placement.gpus)

    def held_gpu_seconds(self, now: float | None = None) -> float:
        """GPU-seconds this host has given to tenants' kernels since it started, those still
        held included: what the gateway's ledger should add up to for this host."""
        now = time.time() if now is None else now
        holding = sum(
            (now - p.started_at) * len(p.gpus)
            for p in self.placements.values()
            if p.claimed and p.released_at is None
        )
        return self.released_gpu_seconds + holding

    def _forget(self, kernel_id: str) -> None:
        self._release_gpus(kernel_id, time.time())
        shell = self.shells.pop(kernel_id, None)
        if shell is not None:
            shell.stop_channels()
        self.allocator.release(kernel_id)
        self.placements.pop(kernel_id, None)
        self.warm.refill_soon()
        self.memory.soon()

    async def _async_shutdown_kernel(
        self, kernel_id: str, now: bool | None = False, restart: bool | None = False
    ) -> None:
        if kernel_id in self.ended:  # a dead kernel: forgetting it is all there is to do
            cleanup = self._cleanups.get(kernel_id)
            if cleanup is not None:  # a DELETE while its cleanup runs waits for it
                await asyncio.wait([cleanup])  # (its failure is logged where it is awaited)
            self.ended.pop(kernel_id, None)
            if kernel_id not in self._kernels:
                return
        await self._end(kernel_id, now=bool(now), restart=bool(restart))

    async def _end(self, kernel_id: str, now: bool, restart: bool) -> None:
        try:
            await super()._async_shutdown_kernel(kernel_id, now=now, restart=restart)
        finally:
            if not restart:
                self._forget(kernel_id)

    shutdown_kernel = _async_shutdown_kernel  # type: ignore[assignment]

    async def _watch_deaths(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            for kernel_id in list(self._kernels):
                await self._poll(kernel_id)

    async def _poll(self, kernel_id: str) -> None:
        # Its own frame: the watch's loop would keep the last kernel it polled, ended or not.
        km = self._kernels.get(kernel_id)
        if km is None or km.shutting_down or km.provisioner is None:
            return
        code = await km.provisioner.poll()
        if code is not None and kernel_id in self._kernels:
            await self._record_death(kernel_id, code)

    async def _record_death(self, kernel_id: str, code: int) -> None:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        visible = self._visible(kernel_id)
        model = self.kernel_model(kernel_id) if visible else None
        self.log.warning("kernel %s process ended (%s)", kernel_id, how)
        for ids in self.warm.ready.values():
            if kernel_id in ids:
                ids.remove(kernel_id)
        # Reported dead, its GPUs free, from now on, also while its cleanup below awaits (a
        # poll in between must find it neither gone nor alive).
        self._release_gpus(kernel_id, time.time())
        self.allocator.release(kernel_id)
        if model is not None:
            model.update(
                execution_state="dead",
                connections=0,
                reason=f"the kernel process ended unexpectedly ({how}); its variables are lost",
                last_activity=iso(time.time()),
            )
            self.ended[kernel_id] = model
            while len(self.ended) > ENDED_KEPT:
                self.ended.pop(next(iter(self.ended)))
        cleanup = asyncio.ensure_future(self._end(kernel_id, now=True, restart=False))
        self._cleanups[kernel_id] = cleanup
        try:
            await cleanup
        except Exception:
            self.log.exception("cleaning up dead kernel %s", kernel_id)
        finally:
            self._cleanups.pop(kernel_id, None)

    async def _async_shutdown_all(self, now: bool = False) -> None:
        """Stop every kernel, warm ones included; one that fails to stop does not stop the rest."""
        await self.stop_background()
        for kernel_id in list(self._kernels):
            try:
                await self._async_shutdown_kernel(kernel_id, now=True)
            except Exception:
                self.log.exception("could not shut down kernel %s", kernel_id)

    shutdown_all = _async_shutdown_all  # type: ignore[assignment]

    def activity(self) -> list[dict[str, Any]]:
        """Each claimed kernel's state, for heartbeats."""
        return self.list_kernels()
