"""Kernel sessions at the gateway: queued for a GPU, started on a host, followed until they end."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session, sessionmaker
from tornado.httpclient import HTTPClientError

from gpupool.wire import (
    CPU,
    ENDED,
    MAX_GPUS_PER_KERNEL,
    KernelState,
    Shape,
    iso,
    parse_iso,
    shape_of_kernel_name,
)

from .budgets import Budgets
from .errors import ApiError
from .host_client import HostApi, HostClient, error_message
from .ledger import BUDGET, DIED, REVOKED, SHUT_DOWN, Ledger
from .lifecycle import Lifecycle
from .metrics import START_SECONDS
from .pool import READINGS, HostView, Pool
from .shapes import EXECUTION_STATE
from .store import Kernel, Tenant, Token, placement_lock
from .tokens import digest, new_token

log = logging.getLogger(__name__)
UNREACHABLE = "could not be reached"  # in a kernel's reason: its host did not answer a start
START_WAIT_SECONDS = 30.0  # POST /api/kernels waits this long for a free GPU's kernel to start
STOP_WAIT_SECONDS = 15.0  # a relay whose kernel the gateway is stopping waits this long for why
RUNS_OR_WAITS = (KernelState.QUEUED, KernelState.STARTING, KernelState.RUNNING)
LIVE_STATES = (*RUNS_OR_WAITS, KernelState.SUSPENDED)  # not ended
NOT_RUNNING = (KernelState.SUSPENDED, KernelState.QUEUED, KernelState.STARTING)  # nor ended
LEASE_SECONDS = 30.0  # a replica that stops renewing its leases for this long is taken as dead
FOLLOW_SECONDS = 0.5  # how often a replica reads what other replicas changed
GATEWAY_ENV = ("KERNEL_GPU_TYPE", "KERNEL_GPU_COUNT", "KERNEL_IDLE_TIMEOUT", "KERNEL_WORKING_DIR")


@dataclass
class Live:
    """What the gateway knows of a kernel beyond its row: activity and who waits for it."""

    execution_state: str = "starting"
    last_activity: float = field(default_factory=time.time)
    last_client_message: float = 0.0  # only what a client sent, not the kernel's own output
    suspending_since: float | None = None  # while its namespace is saved for an idle suspend
    connections: int = 0
    # Read on every client message, so kept here as well as in the row (state "suspended"),
    # from which `_live` derives it when the gateway first sees the kernel.
    suspended: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Interrupts and restarts reach the host one at a time: two restarts of one kernel at once
    # made the host fail the second (a 502 to its user).
    acting: asyncio.Lock = field(default_factory=asyncio.Lock)

    def touch(self) -> None:
        self.last_activity = time.time()

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


def read_shape(name: str, env: dict[str, str]) -> Shape:
    shape = shape_of_kernel_name(name)
    if shape is None:
        raise ApiError(
            404, f"no kernelspec named {name[:80]!r}; GET /api/kernelspecs lists the shapes."
        )
    if shape.gpu_count > MAX_GPUS_PER_KERNEL:
        raise ApiError(400, f"{name} asks for {shape.gpu_count} GPUs; one kernel may hold at "
                            f"most {MAX_GPUS_PER_KERNEL}: ask for fewer.")  # fmt: skip
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
    def __init__(
        self, db: sessionmaker[Session], pool: Pool, host_api: HostApi | None = None
    ) -> None:
        self.db = db
        self.pool = pool
        self.live: dict[str, Live] = {}
        self.missed: set[str] = set()  # running kernels missing from their host's last report
        # Host kernel ids the gateway is stopping (shut down, culled, revoked, orphans): their
        # end is the gateway's to record, not a heartbeat's or a relay's.
        self.stopping: set[str] = set()
        self.host_call: HostApi = host_api or HostClient()
        self._dispatching = asyncio.Lock()
        self.ledger = Ledger(db)
        self.lifecycle = Lifecycle(db, self.ledger)
        self.budgets = Budgets(self.ledger)
        # Idle handling; the app sets these from its options.
        self.idle_default = 600.0
        self.idle_min = 1.0
        self.idle_max = 7 * 24 * 3600.0
        self.idle_action = "suspend"
        self.public_url = ""  # given to kernels as GPUPOOL_URL; the app sets it
        # Other gateways (replicas) may share the database: what they change is read back
        # (`follow`), and their leases are respected. SQLite has one gateway.
        self.shared = db.kw["bind"].dialect.name != "sqlite" if db.kw.get("bind") else False
        # This process among the replicas: the owner of the leases it takes.
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_seconds = LEASE_SECONDS
        self._renewed = 0.0
        self._followed: dict[str, str] = {}  # kernel id -> its row state at the last read

    # -- reading ---------------------------------------------------------------------------

    def live_of(self, kernel_id: str) -> Live:
        live = self.live.get(kernel_id)
        if live is None:
            # First seen by this process, after a restart too: what the next client message
            # needs (whether it resumes the kernel) comes from the row, not from a default.
            with self.db() as s:
                kernel = s.get(Kernel, kernel_id)
            live = Live(suspended=kernel is not None and kernel.state == KernelState.SUSPENDED)
            self.live[kernel_id] = live
        return live

    def get(self, tenant: Tenant, kernel_id: str) -> Kernel:
        """The tenant's kernel, or 404 exactly as for an id that never existed."""
        with self.db() as s:
            kernel = s.get(Kernel, kernel_id)
        if kernel is None or kernel.tenant_id != tenant.id or kernel.state == KernelState.DELETED:
            raise ApiError(404, f"Kernel does not exist: {kernel_id}")
        return kernel

    def ever_owned(self, tenant: Tenant, kernel_id: str) -> bool:
        """Whether the kernel is (or was, shut down included) the tenant's: its usage stays."""
        with self.db() as s:
            kernel = s.get(Kernel, kernel_id)
        return kernel is not None and kernel.tenant_id == tenant.id

    def model(self, kernel: Kernel) -> dict[str, Any]:
        live = self.live_of(kernel.id)
        billed, cost, since = self.ledger.holding(kernel.id)
        placing = kernel.state in (KernelState.QUEUED, KernelState.STARTING)
        resuming = placing and bool(kernel.checkpoint)
        state = KernelState.RESUMING if resuming else kernel.state
        gpupool: dict[str, Any] = {
            "state": state,
            "gpu_type": kernel.gpu_type,
            "gpu_count": kernel.gpu_count,
            "billed_seconds": round(billed, 3),
            "cost_usd": round(cost, 6),
            "reason": kernel.reason,
            "idle_timeout": kernel.idle_timeout,
            "idle_deadline": self._deadline(kernel, live),
        }
        if kernel.state == KernelState.QUEUED:
            gpupool["queue_position"] = self.queue_position(kernel)
        host = self.pool.hosts.get(kernel.host_id or "")
        if kernel.state == KernelState.RUNNING and since is not None and host is not None:
            # Only the GPUs this kernel holds: the caller's own kernel, nothing of anyone else's.
            gpupool["host"] = host.name
            gpupool["started"] = iso(since)
            gpupool["gpus"] = [
                {"uuid": uuid, **{key: host.readings.get(uuid, {}).get(key) for key in READINGS}}
                for uuid in kernel.gpus
            ]
        if kernel.state == KernelState.RUNNING:
            execution_state = live.execution_state
        else:
            execution_state = EXECUTION_STATE.get(state, "unknown")
        return {
            "id": kernel.id,
            "name": kernel.name,
            "last_activity": iso(live.last_activity),
            "execution_state": execution_state,
            "connections": live.connections,
            "gpupool": gpupool,
        }

    @staticmethod
    def _deadline(kernel: Kernel, live: Live) -> str | None:
        """When the kernel will be suspended if nothing happens; a busy kernel is never idle,
        so its deadline is a full timeout from now."""
        if kernel.state != KernelState.RUNNING:
            return None
        if live.suspending_since is not None:  # the deadline passed; the checkpoint is running
            return iso(live.suspending_since)
        start = time.time() if live.execution_state == "busy" else live.last_activity
        return iso(start + kernel.idle_timeout)

    def list_for(self, tenant: Tenant) -> list[dict[str, Any]]:
        with self.db() as s:
            rows = s.scalars(
                select(Kernel).where(
                    Kernel.tenant_id == tenant.id,
                    Kernel.state.not_in(ENDED),
                )
            ).all()
        return [self.model(k) for k in rows]

    def queued(self, gpu_type: str | None = None) -> list[str]:
        """The queue, first come first: queued kernels by when they joined it (of `gpu_type`
        only, when given). Read from the database, where every gateway sees the same."""
        query = select(Kernel.id).where(Kernel.state == KernelState.QUEUED)
        if gpu_type is not None:
            query = query.where(Kernel.gpu_type == gpu_type)
        with self.db() as s:
            return list(s.scalars(query.order_by(Kernel.queued_at, Kernel.created, Kernel.id)))

    def queue_position(self, kernel: Kernel) -> int:
        """1 for the first in the queue (of any GPU type)."""
        queue = self.queued()
        return queue.index(kernel.id) + 1 if kernel.id in queue else 1

    def counts(self) -> dict[str, int]:
        """Kernels by row state, deleted ones left out: counted by the database (each scrape)."""
        with self.db() as s:
            rows = s.execute(
                select(Kernel.state, func.count())
                .where(Kernel.state != KernelState.DELETED)
                .group_by(Kernel.state)
            ).all()
        return {str(state): int(count) for state, count in rows}

    # -- starting --------------------------------------------------------------------------

    async def create(self, tenant: Tenant, name: str, env: dict[str, str]) -> dict[str, Any]:
        shape = read_shape(name, env)
        why = self.pool.impossible(shape)
        if why:
            raise ApiError(400, why)
        self._check_caps(tenant, shape)
        if shape.gpu_count:
            over = self.budgets.refusal(tenant)
            if over:
                raise ApiError(402, over)
        idle_timeout = self.idle_timeout_for(tenant, env.get("KERNEL_IDLE_TIMEOUT"))
        now = time.time()
        kernel = Kernel(
            idle_timeout=idle_timeout,
            id=str(uuid.uuid4()), tenant_id=tenant.id, name=shape.kernel_name,
            gpu_type=shape.gpu_type, gpu_count=shape.gpu_count, state=KernelState.QUEUED,
            created=now, queued_at=now,
            env={k: v for k, v in env.items() if k not in GATEWAY_ENV},
        )  # fmt: skip
        with self.db() as s:
            s.add(kernel)
            s.commit()
        live = self.live_of(kernel.id)
        waiter = live.changed
        await self.dispatch()
        kernel = self.row(kernel.id)
        deadline = time.monotonic() + START_WAIT_SECONDS
        while kernel.state == KernelState.STARTING and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(waiter.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                pass  # it goes on starting; the client sees "starting" and may connect already
            waiter = live.changed
            kernel = self.row(kernel.id)
        if kernel.state == KernelState.DEAD:
            if UNREACHABLE in kernel.reason:  # the host's fault, not the request's: try later
                raise ApiError(
                    503, f"the kernel could not start: {kernel.reason}. Nothing was billed; ask "
                    "the pool's operator to check that host, then try again.", retry_after=30,
                )  # fmt: skip
            raise ApiError(500, f"the kernel could not start: {kernel.reason}")
        return self.model(kernel)

    def _gateway_env(self, kernel: Kernel) -> dict[str, str]:
        """GPUPOOL_URL and a token of the kernel's own, so that `%%gpu` works inside it: the
        token acts for the kernel's tenant and is revoked when this kernel process ends."""
        if not self.public_url or self.row(kernel.id).state != KernelState.STARTING:
            return {}  # (shut down before its start began: its tokens are gone, none is added)
        token = new_token()
        with self.db() as s:
            self._revoke_kernel_tokens(s, kernel.id)
            s.add(Token(tenant_id=kernel.tenant_id, digest=digest(token), prefix=token[:6],
                        kernel_id=kernel.id))  # fmt: skip
            s.commit()
        return {"GPUPOOL_URL": self.public_url, "GPUPOOL_TOKEN": token}

    def _revoke_kernel_tokens(self, s: Session, kernel_id: str) -> None:
        """A kernel's own tokens are deleted, not kept revoked: nobody lists or restores them,
        and a kernel resumed a thousand times would otherwise leave a thousand rows."""
        s.execute(delete(Token).where(Token.kernel_id == kernel_id))

    def row(self, kernel_id: str) -> Kernel:
        with self.db() as s:
            kernel = s.get(Kernel, kernel_id)
        assert kernel is not None
        return kernel

    def _check_caps(self, tenant: Tenant, shape: Shape) -> None:
        with self.db() as s:
            active = s.scalars(
                select(Kernel).where(
                    Kernel.tenant_id == tenant.id,
                    Kernel.state.not_in(ENDED),
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
            with placement_lock(self.db):  # no await inside: a pass takes milliseconds
                self._place_queued()

    def _place_queued(self) -> None:
        """One placement pass, under the placement lock: the GPUs held and reserved are read
        from the database, so a kernel another replica placed a moment ago counts."""
        with self.db() as s:
            rows = s.execute(
                select(Kernel.id, Kernel.host_id, Kernel.state, Kernel.gpu_type,
                       Kernel.gpu_count, Kernel.gpus)
                .where(Kernel.state.in_((KernelState.STARTING, KernelState.RUNNING)))
            ).all()  # fmt: skip
        self.pool.hold(list(rows))
        blocked: set[str | None] = set()
        refusals: dict[int, str | None] = {}
        for kernel_id in self.queued():
            kernel = self.row(kernel_id)
            shape = Shape(kernel.gpu_type, kernel.gpu_count)
            if shape.gpu_type in blocked:
                continue
            if shape.gpu_count and self._over_budget(kernel.tenant_id, refusals):
                why = refusals[kernel.tenant_id]
                if kernel.checkpoint:  # a resume: it stays suspended, its variables kept
                    self.lifecycle.move(
                        kernel_id, KernelState.SUSPENDED, (KernelState.QUEUED,),
                        closing=BUDGET, reason=f"not resumed: {why}",
                    )  # fmt: skip
                    self.live_of(kernel_id).suspended = True
                    self.live_of(kernel_id).notify()
                else:
                    self.end(kernel_id, f"not started: {why}")
                continue
            keeper = self.pool.hosts.get(kernel.checkpoint.get("host_id", ""))
            if keeper is not None and not keeper.lost:
                # A resume waits for the host that has its variables (others may go first
                # meanwhile): starting elsewhere would lose them.
                host = self.pool.place_on(shape, keeper.id)
                if host is None:
                    continue
            else:
                host = self.pool.place(shape)
            if host is None:
                blocked.add(shape.gpu_type)
                continue
            started = self.lifecycle.move(
                kernel_id, KernelState.STARTING, (KernelState.QUEUED,), host_id=host.id,
                lease_owner=self.owner, lease_until=time.time() + self.lease_seconds,
            )  # fmt: skip
            if started is None:
                continue  # ended meanwhile
            host.reserved[kernel_id] = shape
            asyncio.get_running_loop().create_task(self._start_on(host, kernel))
        for kernel_id in self.queued():
            self.live_of(kernel_id).notify()  # queue positions moved

    # -- beside other replicas -------------------------------------------------------------

    def requeue_abandoned(self, everyone: bool = False) -> list[str]:
        """Kernels left starting by a gateway that stopped (its lease expired) join the queue
        again, at the place they had; with `everyone`, every starting kernel (a lone gateway's
        restart: nobody else can be starting them). The ids requeued."""
        query = select(Kernel.id).where(Kernel.state == KernelState.STARTING)
        if not everyone:
            expired = or_(Kernel.lease_until.is_(None), Kernel.lease_until < time.time())
            query = query.where(expired)
        with self.db() as s:
            ids = list(s.scalars(query))
        requeued = []
        for kernel_id in ids:
            starting = (KernelState.STARTING,)
            if not everyone and not self.lifecycle.claim(
                kernel_id, self.owner, self.lease_seconds, KernelState.STARTING
            ):
                continue  # its replica renewed the lease meanwhile, or another took it
            if self.lifecycle.move(kernel_id, KernelState.QUEUED, starting) is not None:
                requeued.append(kernel_id)
        if requeued and not everyone:
            log.warning("%d kernel(s) left starting by a gateway replica that stopped wait in "
                        "the queue again", len(requeued))  # fmt: skip
        return requeued

    async def follow(self) -> None:
        """Beside other replicas: renew this one's leases, take over the starts of replicas
        that died, wake whoever here waits on a kernel another replica moved, and start what
        waits in the queue (a GPU another replica's kernel gave back)."""
        while True:
            await asyncio.sleep(FOLLOW_SECONDS)
            try:
                await self.follow_once()
            except Exception:
                log.exception("reading other replicas' changes failed; trying again")

    async def follow_once(self) -> None:
        now = time.time()
        if now - self._renewed >= self.lease_seconds / 3:
            self.lifecycle.renew(self.owner, self.lease_seconds)
            self._renewed = now
        self.requeue_abandoned()
        ids = [k for k in self.live if self._followed.get(k) not in ENDED]
        for first in range(0, len(ids), 500):
            chunk = ids[first : first + 500]
            with self.db() as s:
                rows = s.execute(select(Kernel.id, Kernel.state).where(Kernel.id.in_(chunk))).all()
            for kernel_id, state in rows:
                before = self._followed.get(kernel_id)
                self._followed[kernel_id] = state
                # First read included: a kernel this replica queued may be running already,
                # placed and started by another replica, and its POST here waits to hear it.
                if before != state:
                    live = self.live_of(kernel_id)
                    live.suspended = state == KernelState.SUSPENDED
                    live.notify()
        if self.queued():
            await self.dispatch()

    def _over_budget(self, tenant_id: int, refusals: dict[int, str | None]) -> bool:
        if tenant_id not in refusals:
            with self.db() as s:
                tenant = s.get(Tenant, tenant_id)
            refusals[tenant_id] = self.budgets.refusal(tenant) if tenant is not None else None
        return refusals[tenant_id] is not None

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
            "env": {**kernel.env, **self._gateway_env(kernel)}, "owner": kernel.id,
        }  # fmt: skip
        if kernel.gpu_count:
            body["gpu_type"] = kernel.gpu_type
        asked = time.time()
        # This start acts on the row only while the row is still this attempt: this host, and
        # this replica's lease. (Beside replicas, a start whose lease expired while this one
        # was slow was queued again, and another replica may be starting it elsewhere.)
        mine = {"host_id": host.id, "lease_owner": self.owner}
        starting = (KernelState.STARTING,)
        try:
            reply = await self.host_call(host, "POST", "/api/kernels", body)
        except HTTPClientError as error:
            host.reserved.pop(kernel.id, None)
            if not self._is_mine(kernel.id, mine):
                return  # shut down, lost with its host, or taken over, while the host answered
            if error.code == 409:  # our view of the host was stale: wait for the next GPU
                queued = KernelState.QUEUED
                if self.lifecycle.move(kernel.id, queued, starting, only_if=mine, host_id=None):
                    self.live_of(kernel.id).notify()  # create() answers "queued" now
                return
            why = f"host {host.name} refused to start it: {error_message(error)}"
            self.end(kernel.id, why, only_if=mine)
            return
        except Exception as error:
            host.reserved.pop(kernel.id, None)
            why = f"host {host.name} {UNREACHABLE} at {host.url} ({error})"
            self.end(kernel.id, why, only_if=mine)
            return
        host.reserved.pop(kernel.id, None)
        gpus = list(reply["gpupool"]["gpus"])
        if not self._is_mine(kernel.id, mine):
            # Shut down, lost with its host, or taken over, while the host started it: stop it
            # there too, or it would hold its GPUs with no one to use or bill them.
            log.info("kernel %s ended while starting; stopping it on %s", kernel.id, host.name)
            asyncio.get_running_loop().create_task(self.stop_on_host(host, str(reply["id"])))
            return
        host.held[kernel.id] = gpus
        # Billed from when the host gave it its GPUs (a cold start holds them while the kernel
        # boots), within what this gateway saw, since the host's clock may differ.
        now = time.time()
        since = reply["gpupool"].get("held_since")
        held = min(max(asked, since), now) if isinstance(since, int | float) else now
        current = self.row(kernel.id)  # a restart meanwhile dropped its checkpoint
        if current.checkpoint:
            await self._restore_on(host, current, str(reply["id"]))
        if not self._mark_running(kernel.id, str(reply["id"]), gpus, held, mine):
            log.info("kernel %s ended while restoring; stopping it on %s", kernel.id, host.name)
            asyncio.get_running_loop().create_task(self.stop_on_host(host, str(reply["id"])))
            return
        live = self.live_of(kernel.id)
        live.execution_state = reply.get("execution_state", "idle")
        live.touch()
        START_SECONDS.observe(time.time() - kernel.created)
        live.notify()

    def _is_mine(self, kernel_id: str, mine: dict[str, Any]) -> bool:
        row = self.row(kernel_id)
        return row.state == KernelState.STARTING and all(
            getattr(row, key) == value for key, value in mine.items()
        )

    def _mark_running(
        self,
        kernel_id: str,
        host_kernel_id: str,
        gpus: list[str],
        held: float,
        mine: dict[str, Any],
    ) -> bool:
        """Running, and its ledger interval open from `held`, in one transaction; False (and
        nothing written) if it was shut down, lost or taken over meanwhile."""
        running = self.lifecycle.move(
            kernel_id, KernelState.RUNNING, (KernelState.STARTING,), at=held, only_if=mine,
            host_kernel_id=host_kernel_id, gpus=gpus, checkpoint={},
        )  # fmt: skip
        return running is not None

    # -- ending ----------------------------------------------------------------------------

    def end(
        self,
        kernel_id: str,
        reason: str,
        state: KernelState = KernelState.DEAD,
        ended: float | None = None,
        closing: str = DIED,
        only_if: dict[str, Any] | None = None,
    ) -> None:
        """The kernel is over: its GPUs go back and its interval closes at `ended` (the last
        time it was seen alive, when known), for the ledger reason `closing`. Its owner shutting
        down a kernel that died already changes only its state: why it died stays. `only_if`:
        as for `Lifecycle.move`."""
        ending = LIVE_STATES if state == KernelState.DELETED else RUNS_OR_WAITS
        moved = self.lifecycle.move(
            kernel_id, state, ending, at=ended, closing=closing, reason=reason, only_if=only_if
        )
        if moved is None:
            if state == KernelState.DELETED:
                self.lifecycle.move(kernel_id, state, (KernelState.DEAD,), closing=closing)
            return
        for host in self.pool.hosts.values():
            host.held.pop(kernel_id, None)
            host.reserved.pop(kernel_id, None)
        self.missed.discard(kernel_id)
        live = self.live_of(kernel_id)
        live.execution_state = "dead"
        live.notify()
        asyncio.get_running_loop().create_task(self.dispatch())

    async def stop_on_host(self, host: HostView, host_kernel_id: str) -> None:
        self.stopping.add(host_kernel_id)
        try:
            await self.host_call(host, "DELETE", f"/api/kernels/{host_kernel_id}")
        except Exception as error:  # already gone (404), or the host went away: nothing to stop
            log.info("could not stop kernel %s on %s: %s", host_kernel_id, host.name, error)
        finally:
            self.stopping.discard(host_kernel_id)

    async def delete(self, tenant: Tenant, kernel_id: str) -> None:
        kernel = self.get(tenant, kernel_id)
        host = self.pool.hosts.get(kernel.host_id or "")
        if kernel.state == KernelState.RUNNING and host is not None and kernel.host_kernel_id:
            self.stopping.add(kernel.host_kernel_id)
            try:
                await self.host_call(host, "DELETE", f"/api/kernels/{kernel.host_kernel_id}")
            except HTTPClientError as error:
                if error.code != 404:
                    raise ApiError(
                        502, f"host {host.name} could not stop it: {error_message(error)}"
                    ) from None
            except OSError as error:
                log.warning(
                    "host %s unreachable while deleting %s: %s", host.name, kernel_id, error
                )
            finally:
                self.stopping.discard(kernel.host_kernel_id)
        self.end(kernel_id, "shut down by its owner", state=KernelState.DELETED, closing=SHUT_DOWN)
        if kernel.checkpoint:  # shut down while suspended (or waiting to resume)
            await self._discard_checkpoint(tenant.name, kernel)

    async def end_tenant(self, tenant: Tenant, why: str) -> int:
        """Shut down every kernel of the tenant's (its tenant was revoked): billing ends now,
        their host kernels stop and their checkpoints go; how many there were."""
        with self.db() as s:
            rows = s.scalars(
                select(Kernel).where(
                    Kernel.tenant_id == tenant.id,
                    Kernel.state.not_in(ENDED),
                )
            ).all()
        now = time.time()
        running = [k for k in rows if k.state == KernelState.RUNNING and k.host_kernel_id]
        # Those waiting first, so that none starts meanwhile (one starting is stopped when its
        # host answers); running ones once stopped, so their GPUs go to no one before that.
        for kernel in rows:
            if kernel not in running:
                self.end(kernel.id, why, state=KernelState.DELETED, ended=now, closing=REVOKED)

        async def stop_then_end(kernel: Kernel) -> None:
            # Ended as soon as its own stop returns (no await between): a heartbeat that comes
            # meanwhile would otherwise find it stopped, no longer marked stopping, and close its
            # billing as "died" instead of "revoked".
            host = self.pool.hosts.get(kernel.host_id or "")
            if host is not None:
                await self.stop_on_host(host, str(kernel.host_kernel_id))
            self.end(kernel.id, why, state=KernelState.DELETED, ended=now, closing=REVOKED)

        await asyncio.gather(*(stop_then_end(kernel) for kernel in running))
        for kernel in rows:
            if kernel.checkpoint:
                await self._discard_checkpoint(tenant.name, kernel)
        return len(rows)

    async def check_on_host(self, kernel_id: str) -> Kernel:
        """Ask the host about a running kernel whose connection just ended: one the host
        reports dead, or no longer knows, is marked dead (billing ends) with the host's reason.
        An unreachable host decides nothing here: missed heartbeats do (`host_lost`)."""
        kernel = self.row(kernel_id)
        host = self.pool.hosts.get(kernel.host_id or "")
        if kernel.state != KernelState.RUNNING or host is None or not kernel.host_kernel_id:
            return kernel
        if kernel.host_kernel_id in self.stopping:  # the gateway ends it: wait for its reason
            try:
                await asyncio.wait_for(self.live_of(kernel_id).changed.wait(), STOP_WAIT_SECONDS)
            except asyncio.TimeoutError:
                pass
            return self.row(kernel_id)
        now = time.time()
        try:
            reported = await self.host_call(host, "GET", f"/api/kernels/{kernel.host_kernel_id}")
        except HTTPClientError as error:
            reported = {"execution_state": "dead", "reason": "the host no longer runs it"}
            if error.code != 404:
                return kernel
        except Exception as error:
            log.info("kernel %s: its host %s cannot be reached: %s", kernel_id, host.name, error)
            return kernel
        latest = self.row(kernel_id)
        if reported.get("execution_state") != "dead" or latest.state != KernelState.RUNNING:
            return latest
        if latest.host_kernel_id != kernel.host_kernel_id:
            return latest  # restarted elsewhere meanwhile
        seen = latest.last_seen_alive or now
        died = min(max(time_of(reported.get("last_activity")) or now, seen), now)
        self.end(kernel_id, f"on host {host.name}: {reported.get('reason')}", ended=died)
        return self.row(kernel_id)

    async def _discard_checkpoint(self, tenant_name: str, kernel: Kernel) -> None:
        """Delete a checkpoint that no kernel will resume from."""
        host = self.pool.hosts.get(kernel.checkpoint.get("host_id", ""))
        name = kernel.checkpoint.get("file")
        if host is None or not isinstance(name, str):
            return
        try:
            await self.host_call(host, "DELETE", f"/api/checkpoints/{tenant_name}/{name}")
        except Exception as error:  # 404: already gone; else the host is away, and it stays
            log.info("could not delete checkpoint %s on %s: %s", name, host.name, error)

    async def action(self, tenant: Tenant, kernel_id: str, action: str) -> dict[str, Any]:
        kernel = self.get(tenant, kernel_id)
        if kernel.state == KernelState.DEAD:
            raise ApiError(409, f"kernel {kernel_id} is dead ({kernel.reason}); start a new one.")
        live = self.live_of(kernel_id)
        live.touch()  # the user's own act: the idle clock restarts, and a suspend under way stops
        live.last_client_message = live.last_activity
        async with live.acting:
            kernel = self.row(kernel_id)  # as it is now, after any action before this one
            host = self.pool.hosts.get(kernel.host_id or "")
            if action == "restart" and kernel.state in NOT_RUNNING and kernel.checkpoint:
                # A restart is a fresh namespace: the saved variables are dropped, so the next
                # message (or the resume under way) starts the kernel anew instead of bringing
                # them back.
                self._set(kernel_id, checkpoint={})
                await self._discard_checkpoint(tenant.name, kernel)
            if kernel.state == KernelState.RUNNING and host is not None:
                path = f"/api/kernels/{kernel.host_kernel_id}/{action}"
                try:
                    await self.host_call(host, "POST", path)
                except HTTPClientError as error:
                    raise ApiError(
                        502, f"host {host.name} could not {action} it: {error_message(error)}"
                    ) from None
        return self.model(self.row(kernel_id))

    # -- idle: suspend and resume ---------------------------------------------------------

    def idle_timeout_for(self, tenant: Tenant, given: str | None) -> float:
        low = tenant.idle_min if tenant.idle_min is not None else self.idle_min
        high = tenant.idle_max if tenant.idle_max is not None else self.idle_max
        if given is None:
            return min(max(self.idle_default, low), high)
        try:
            value = float(given)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # NaN fails too
            raise ApiError(
                400, f"KERNEL_IDLE_TIMEOUT is {given[:20]!r}; tenant {tenant.name} may use "
                f"{low:g} to {high:g} seconds.",
            )  # fmt: skip
        return value

    async def _restore_on(self, host: HostView, kernel: Kernel, host_kernel_id: str) -> None:
        """Put a suspended kernel's variables into its new kernel; what fails is named to the
        user in the next cell's output by the kernel itself. The checkpoint is deleted after
        (the next suspend writes a new one), unless the restore failed: then it stays, for a
        look by hand."""
        if not kernel.checkpoint:
            return  # none to restore (the kernel was restarted while it was suspended)
        with self.db() as s:
            tenant = s.get(Tenant, kernel.tenant_id)
        assert tenant is not None
        if kernel.checkpoint.get("host_id") == host.id:
            try:
                await self.host_call(
                    host, "POST", f"/api/kernels/{host_kernel_id}/restore",
                    {"path": kernel.checkpoint["path"]},
                )  # fmt: skip
            except Exception as error:
                log.warning("restoring kernel %s failed: %s", kernel.id, error)
                return
        else:
            log.warning("kernel %s resumed on another host without its variables", kernel.id)
        asyncio.get_running_loop().create_task(self._discard_checkpoint(tenant.name, kernel))


def time_of(text: Any) -> float | None:
    """A time in the kernel model's format as a Unix time; None if it is not one."""
    try:
        return parse_iso(text)
    except ValueError:
        return None
