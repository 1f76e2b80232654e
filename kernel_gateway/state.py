"""The gateway's state in one place: database, pool, kernels, tenants and the host watch."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Collection
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, sessionmaker
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from gpupool.wire import ENDED, KernelState

from . import host_report
from .auth_limit import FailedAuth
from .budgets import read_budget
from .errors import ApiError
from .idle import IdleWatcher
from .kernels import GatewayKernels
from .pool import HostView, Pool
from .reconcile import HostReconciler
from .shares import SWEEP_SECONDS, Shares
from .store import Host, Kernel, Secret, Tenant, Token
from .suspension import Suspensions
from .tenant_limits import TenantLimits
from .tokens import digest, host_token, new_token, same

log = logging.getLogger(__name__)
TENANT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
# After a restart, a host not yet heard from may be in its retry backoff (gpu_host's
# --gateway-max-backoff, 30 s by default, +-20%): it is lost only after this much more.
RESTART_GRACE_SECONDS = 40.0
TENANT_BY_TOKEN = (
    select(Tenant)
    .join(Token, Token.tenant_id == Tenant.id)
    .where(Token.digest == bindparam("digest"), Token.revoked.is_(False), Tenant.revoked.is_(False))
)
PROBE_SECONDS = 5.0  # a host whose heartbeats are late has this long to answer a probe
REVOKED_CLOSE = "this tenant was revoked by the gateway's admin; ask them for a new token."


class GatewayState:
    def __init__(
        self,
        db: sessionmaker[Session],
        admin_token: str,
        join_token: str,
        host_timeout: float,
        serving: bool = True,
        host_key: str = "",
        replace_secrets: Collection[str] = ("admin", "join"),
    ) -> None:
        """`serving`: this process is the gateway, so it takes over the state left by the last
        one (queue, ledger repair); `gpupool tenant` only edits tenants, beside a live one.
        The admin and join tokens given are checked by their digests in the database: stored
        where it has none, and those named in `replace_secrets` in place of others (app.py)."""
        self.db = db
        self.admin_token = admin_token
        self.join_token = join_token
        self.host_key = host_key  # hosts' tokens are derived from it (tokens.host_token)
        self.host_timeout = host_timeout
        self.failed_auth = FailedAuth(per_minute=100)  # the app sets it from its option
        self.limits = TenantLimits()  # the app sets its caps from its options
        self.pool = Pool()
        self.kernels = GatewayKernels(db, self.pool)
        self.reconciler = HostReconciler(self.kernels)
        self.suspensions = Suspensions(self.kernels)
        self.shares: Shares | None = None  # set by the app, which knows the state folder
        self.share_sweep_seconds = SWEEP_SECONDS  # the app sets it from its option
        self._watch: asyncio.Task[None] | None = None
        self._budget_watch: asyncio.Task[None] | None = None
        self.unheard = self.pool.unheard
        self.probing: set[str] = set()  # hosts whose heartbeats are late, being asked directly
        self.started = time.time()  # a host heard from since, by any replica, is not unheard
        if serving:
            for name, token in (("admin", admin_token), ("join", join_token)):
                if token and not self.keep_secret(name, token, name in replace_secrets):
                    log.warning(
                        "the %s token of this gateway's state folder is not the one in its "
                        "database, which another gateway set; that one is used. To replace it, "
                        "start a gateway with GPUPOOL_%s_TOKEN set.", name, name.upper(),
                    )  # fmt: skip
            self._load()

    def _load(self) -> None:
        """After a restart: hosts and their running kernels, as they were."""
        # A kernel that was starting when the gateway stopped is queued again, at the place it
        # had (its `queued_at`), where those still queued wait as they were.
        # Beside other replicas, only those whose replica stopped: the others' starts go on.
        self.kernels.requeue_abandoned(everyone=not self.kernels.shared)
        with self.db() as s:
            # A database of an older gpupool kept hosts' tokens themselves: only digests stay,
            # and each such host, refused at its next heartbeat, registers again for a new one.
            for host in s.scalars(select(Host).where(Host.token_salt.is_(None))).all():
                host.token, host.token_salt = digest(host.token), ""
            for host in s.scalars(select(Host).where(Host.lost.is_(False))).all():
                try:  # a row saved before reports were checked must not stop the gateway
                    gpus = host_report.gpus(host.gpus)
                except ApiError as error:
                    log.warning("host %s in the database is skipped until it registers again: "
                                "%s", host.name, error.message)  # fmt: skip
                    continue
                view = HostView(
                    host.id, host.name, host.url, self._host_token(host), last_seen=time.time()
                )
                view.update(gpus)
                view.salt = host.token_salt or ""
                self.pool.hosts[host.id] = view
            self.unheard.update(self.pool.hosts)  # not heard from since this restart
            for kernel in s.scalars(select(Kernel).where(Kernel.state == KernelState.RUNNING)):
                if kernel.host_id in self.pool.hosts:
                    self.pool.hosts[kernel.host_id].held[kernel.id] = list(kernel.gpus)
            # Intervals of running kernels go on: their GPUs stayed held while we were away.
            repaired = self.kernels.ledger.repair(s)
            s.commit()
        for row in repaired:
            log.warning("closed the ledger interval %s left open for a kernel that had ended",
                        row.key)  # fmt: skip
            self.kernels.ledger.counted(row)

    # -- identity --------------------------------------------------------------------------

    def is_admin(self, token: str) -> bool:
        return self._is_secret("admin", token)

    def is_join(self, token: str) -> bool:
        return self._is_secret("join", token)

    def _is_secret(self, name: str, token: str) -> bool:
        """Whether `token` is the gateway's admin or join token: its digest against the one in
        the database, which every replica and command shares."""
        if not token:
            return False
        with self.db() as s:
            row = s.get(Secret, name)
        return row is not None and same(digest(token), row.digest)

    def keep_secret(self, name: str, token: str, replace: bool) -> bool:
        """Put `token`'s digest in the database as the `name` token: where it has none, or,
        with `replace`, in place of another. False: the database keeps another one."""
        with self.db() as s:
            row = s.get(Secret, name)
            if row is None:
                s.add(Secret(name=name, digest=digest(token), updated=time.time()))
            elif not same(row.digest, digest(token)):
                if not replace:
                    return False
                row.digest, row.updated = digest(token), time.time()
                log.warning("the %s token this gateway was given replaces the one in the "
                            "database, for every replica and command", name)  # fmt: skip
            s.commit()
        return True

    def tenant_for(self, token: str) -> Tenant | None:
        # One query, not two (token, then tenant), built once: every authenticated request
        # asks it, and building the statement cost as much as running it.
        with self.db() as s:
            return s.scalars(TENANT_BY_TOKEN, {"digest": digest(token)}).first()

    # -- tenants ---------------------------------------------------------------------------

    def create_tenant(
        self,
        name: str,
        max_gpus: int | None = None,
        max_kernels: int | None = None,
        idle_min: float | None = None,
        idle_max: float | None = None,
        budget_usd: Any = None,
        allow_shared_host: bool = False,
        how_to_allow: str = 'send "allow_shared_host": true',
    ) -> tuple[Tenant, str]:
        """A new tenant and its first token. A tenant beside others on a host that runs every
        tenant's kernels as one Unix user (no isolation) is refused with 409 unless
        `allow_shared_host`; `how_to_allow` says, in the caller's words, how to accept it."""
        if not isinstance(name, str) or not TENANT_NAME.match(name):
            raise ApiError(
                400, "a tenant name is 1 to 24 lower-case letters, digits or dashes, "
                "starting with a letter.",
            )  # fmt: skip
        for label, value in (("max_gpus", max_gpus), ("max_kernels", max_kernels)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= 10_000):  # fmt: skip
                raise ApiError(400, f"{label} must be a whole number from 0 to 10000.")
        for label, bound in (("idle_min", idle_min), ("idle_max", idle_max)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)
                                      or not 1 <= bound <= 30 * 24 * 3600):  # fmt: skip
                raise ApiError(400, f"{label} must be a number of seconds from 1 to 2592000.")
        if idle_min is not None and idle_max is not None and idle_min > idle_max:
            raise ApiError(400, f"idle_min ({idle_min:g}) is above idle_max ({idle_max:g}).")
        budget = read_budget(budget_usd)
        shared = [] if allow_shared_host else self.shared_hosts()
        with self.db() as s:
            if s.scalars(select(Tenant).where(Tenant.name == name)).first():
                raise ApiError(409, f"tenant {name} already exists; create a token for it instead.")
            if shared and s.scalars(select(Tenant.id).limit(1)).first() is not None:
                raise ApiError(
                    409, f"host {shared[0]} runs every tenant's kernels as one Unix user, so a "
                    "second tenant could read the first one's files and kernels; run that host "
                    f"as root to isolate tenants, or {how_to_allow} to accept this.",
                )  # fmt: skip
            tenant = Tenant(
                name=name, max_gpus=max_gpus, max_kernels=max_kernels,
                idle_min=idle_min, idle_max=idle_max, budget_usd=budget,
            )  # fmt: skip
            s.add(tenant)
            s.flush()
            token = self._add_token(s, tenant)
            s.commit()
        return tenant, token

    def _add_token(self, s: Session, tenant: Tenant) -> str:
        token = new_token()
        s.add(Token(tenant_id=tenant.id, digest=digest(token), prefix=token[:6]))
        return token

    def new_token_for(self, name: str) -> str:
        with self.db() as s:
            tenant = s.scalars(select(Tenant).where(Tenant.name == name)).first()
            if tenant is None or tenant.revoked:
                raise ApiError(404, f"no tenant named {name!r}.")
            token = self._add_token(s, tenant)
            s.commit()
        return token

    def tenants(self) -> list[dict[str, Any]]:
        with self.db() as s:
            rows = s.scalars(select(Tenant)).all()
            tokens = s.scalars(select(Token)).all()
        return [
            {
                "name": t.name, "max_gpus": t.max_gpus, "max_kernels": t.max_kernels,
                "revoked": t.revoked, "created": t.created,
                **self.kernels.budgets.summary(t),
                "tokens": [{"prefix": k.prefix, "revoked": k.revoked} for k in tokens
                           if k.tenant_id == t.id and k.kernel_id is None],
            }
            for t in rows
        ]  # fmt: skip

    def update_tenant(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Change a tenant's budget or caps; a key sent as null removes that limit."""
        allowed = ("budget_usd", "max_gpus", "max_kernels")
        unknown = sorted(set(body) - set(allowed))
        if unknown or not body:
            raise ApiError(
                400, f"send any of {', '.join(allowed)} to change a tenant"
                + (f"; {', '.join(k[:40] for k in unknown[:5])} cannot be changed." if unknown
                   else "."),
            )  # fmt: skip
        for label in ("max_gpus", "max_kernels"):
            value = body.get(label)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= 10_000):  # fmt: skip
                raise ApiError(400, f"{label} must be a whole number from 0 to 10000, or null.")
        budget = read_budget(body.get("budget_usd"))
        with self.db() as s:
            tenant = s.scalars(select(Tenant).where(Tenant.name == name)).first()
            if tenant is None:
                raise ApiError(404, f"no tenant named {name[:40]!r}.")
            if "budget_usd" in body:
                tenant.budget_usd = budget
            for label in ("max_gpus", "max_kernels"):
                if label in body:
                    setattr(tenant, label, body[label])
            s.commit()
        try:  # a raised budget lets queued kernels start (in the gateway, not `gpupool tenant`)
            asyncio.get_running_loop().create_task(self.kernels.dispatch())
        except RuntimeError:
            pass
        return next(t for t in self.tenants() if t["name"] == name)

    def revoke_tenant(self, name: str) -> Tenant:
        """Revoke the tenant and its tokens in the database; `end_tenant` does the rest."""
        with self.db() as s:
            tenant = s.scalars(select(Tenant).where(Tenant.name == name)).first()
            if tenant is None:
                raise ApiError(404, f"no tenant named {name[:40]!r}.")
            tenant.revoked = True
            for token in s.scalars(select(Token).where(Token.tenant_id == tenant.id)).all():
                token.revoked = True
            s.commit()
        return tenant

    async def end_tenant(self, name: str) -> dict[str, Any]:
        """Revocation ends everything of the tenant's: its tokens stop working, its open kernel
        websockets close, its kernels shut down and their billing ends."""
        tenant = self.revoke_tenant(name)
        sockets = list(self.limits.sockets.get(tenant.id, ()))
        for socket in sockets:
            socket.close(1008, REVOKED_CLOSE)  # 1008: policy violation
        ended = await self.kernels.end_tenant(tenant, "shut down: its tenant was revoked")
        if self.shares is not None:  # its links answer 404 now: their snapshots go at once
            self.shares.sweep()
        log.warning("revoked tenant %s: closed %d websocket(s), shut down %d kernel(s)",
                    tenant.name, len(sockets), ended)  # fmt: skip
        return {"name": tenant.name, "websockets_closed": len(sockets), "kernels_shut_down": ended}

    async def _end_revoked(self) -> None:
        """At start: kernels of tenants revoked while no gateway ran (`gpupool tenant revoke`
        beside a stopped gateway) are shut down, as a live gateway would have."""
        with self.db() as s:
            names = s.scalars(
                select(Tenant.name)
                .join(Kernel, Kernel.tenant_id == Tenant.id)
                .where(
                    Tenant.revoked.is_(True),
                    Kernel.state.not_in(ENDED),
                )
                .distinct()
            ).all()
        for name in names:
            await self.end_tenant(name)

    # -- hosts -----------------------------------------------------------------------------

    def sync_hosts(self, host_id: str | None = None) -> None:
        """Beside other replicas: the hosts as the database has them (of `host_id` only, when
        given). A host registers and heartbeats through any replica, so each replica learns of
        its registration, new token, GPUs, last heartbeat and loss from the database."""
        query = select(Host) if host_id is None else select(Host).where(Host.id == host_id)
        with self.db() as s:
            rows = s.scalars(query).all()
        for row in rows:
            view = self.pool.hosts.get(row.id)
            if row.lost:
                if view is not None:
                    view.lost = True  # lost by another replica, which ended its kernels
                continue
            if view is None or view.salt != (row.token_salt or ""):
                token = self._host_token(row)
                if not token:
                    continue  # not one of ours (another host key): it must register again
                try:
                    gpus = host_report.gpus(row.gpus)
                except ApiError:
                    continue
                view = view or HostView(row.id, row.name, row.url, token, last_seen=0.0)
                view.name, view.url, view.token = row.name, row.url, token
                view.salt = row.token_salt or ""
                view.update(gpus)
                self.pool.hosts[row.id] = view
            elif row.gpus != view.reported:
                view.update(row.gpus)  # checked when the replica that took the report stored it
            view.lost = False
            view.last_seen = max(view.last_seen, row.last_seen)
            if row.last_seen >= self.started:
                self.unheard.discard(row.id)

    def _host_token(self, host: Host) -> str:
        """The token to present to `host`, derived again from the host key; "" where it cannot
        be (no salt: converted from an older database; or another host key)."""
        if not host.token_salt or not self.host_key:
            return ""
        token = host_token(self.host_key, host.token_salt)
        return token if same(digest(token), host.token) else ""

    def shared_hosts(self) -> list[str]:
        """The names of the hosts (not lost) that run every tenant's kernels as one user."""
        with self.db() as s:
            hosts = s.scalars(select(Host).where(Host.lost.is_(False))).all()
        return [h.name for h in hosts if h.isolates is not True]

    def register_host(self, body: dict[str, Any]) -> dict[str, str]:
        url, gpus = body.get("url"), body.get("gpus")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ApiError(400, "a host registers with its url, such as http://10.0.0.5:8890.")
        if not isinstance(gpus, list):
            raise ApiError(400, "a host registers with its list of gpus.")
        name = str(body.get("name") or url)[:255]
        isolates = body.get("isolates") if isinstance(body.get("isolates"), bool) else None
        if not self.host_key:
            raise ApiError(503, "this gateway has no host key to make host tokens with.")
        salt = new_token()
        token = host_token(self.host_key, salt)
        with self.db() as s:
            # The same agent coming back (same URL) keeps its id, so its kernels re-attach.
            host = s.scalars(select(Host).where(Host.url == url)).first()
            if host is None:
                host = Host(id=str(uuid.uuid4()), name=name, url=url, token="", gpus=gpus)
                s.add(host)
            host.token, host.token_salt = digest(token), salt
            host.gpus, host.lost, host.last_seen = gpus, False, time.time()
            host.isolates = isolates
            s.commit()
            host_id = host.id
        # The same view object is kept when a host comes back: starts in flight (`reserved`, and
        # the `held` that `_start_on` fills in when the host answers) still refer to it.
        view = self.pool.hosts.get(host_id) or HostView(host_id, name, url, token)
        view.name, view.url, view.token, view.salt = name, url, token, salt
        view.lost, view.last_seen = False, time.time()
        view.update(gpus)
        self.pool.hosts[host_id] = view
        self.unheard.discard(host_id)
        kernels = body.get("kernels") or []
        self.reconciler.reattach(view, kernels)
        self.reconciler.host_reported(view, kernels)
        log.info("host %s registered with %d GPU(s)", name, len(gpus))
        asyncio.get_running_loop().create_task(self.kernels.dispatch())
        return {"host_id": host_id, "host_token": token}

    def known_host(self, host_id: str, token: str) -> HostView:
        """The host that `token` is the current token of; 404 (the host registers again) if
        none. Beside other replicas, one it registered with elsewhere is read from the
        database first."""

        def known(view: HostView | None) -> bool:
            return view is not None and not view.lost and bool(token) and same(token, view.token)

        view = self.pool.hosts.get(host_id)
        if self.kernels.shared and not known(view) and token:
            self.sync_hosts(host_id)  # it registered (again) through another replica
            view = self.pool.hosts.get(host_id)
        if view is None or not known(view):
            raise ApiError(404, "this gateway does not know that host; register again.")
        return view

    def heartbeat(self, host_id: str, token: str, body: dict[str, Any]) -> None:
        view = self.known_host(host_id, token)
        view.last_seen = time.time()
        self.unheard.discard(host_id)
        gpus = body.get("gpus")
        if isinstance(gpus, list):
            view.update(gpus)
        kernels = body.get("kernels")
        if isinstance(kernels, list):
            self.reconciler.host_reported(view, kernels, at=view.last_seen)
        with self.db() as s:
            host = s.get(Host, host_id)
            if host is not None:
                host.last_seen = view.last_seen
                if isinstance(gpus, list):
                    host.gpus = gpus  # for the other replicas: free GPUs, readings
                s.commit()
        if self.kernels.queued():
            asyncio.get_running_loop().create_task(self.kernels.dispatch())

    def hosts(self) -> list[dict[str, Any]]:
        return [
            {"id": h.id, "name": h.name, "url": h.url, "lost": h.lost, "last_seen": h.last_seen,
             "gpus": {t: {"total": h.total(t), "free": h.free(t)} for t in set(h.devices.values())},
             "kernels": len(h.held)}
            for h in self.pool.hosts.values()
        ]  # fmt: skip

    def start_watch(self) -> None:
        loop = asyncio.get_running_loop()
        self._watch = loop.create_task(self._watch_hosts())
        self._idle = loop.create_task(IdleWatcher(self.suspensions).run())
        self._budget_watch = loop.create_task(self._watch_budgets())
        if self.kernels.shared:
            self._follow = loop.create_task(self.kernels.follow())
        self._revoked = loop.create_task(self._end_revoked())
        if self.shares is not None:
            self._sweep = loop.create_task(self.shares.sweep_forever(self.share_sweep_seconds))

    async def _watch_budgets(self) -> None:
        """Stop the GPU billing of tenants that reach their budget while their kernels run."""
        while True:
            try:
                wait = await self.suspensions.enforce_budgets()
            except Exception:
                log.exception("checking budgets failed; trying again in a second")
                wait = 1.0
            await asyncio.sleep(wait)

    async def _watch_hosts(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.host_timeout / 3))
            if self.kernels.shared:
                try:
                    self.sync_hosts()
                except Exception:
                    log.exception("reading the hosts from the database failed; trying again")
            now = time.time()
            for view in list(self.pool.hosts.values()):
                grace = RESTART_GRACE_SECONDS if view.id in self.unheard else 0.0
                late = not view.lost and now - view.last_seen > self.host_timeout + grace
                if late and view.id not in self.probing:
                    self.probing.add(view.id)
                    asyncio.get_running_loop().create_task(self._probe(view))

    async def _probe(self, view: HostView) -> None:
        """A host whose heartbeats are late is asked once more before it is lost: a burst of
        websockets can hold its heartbeats (or this gateway's reading of them) past the timeout
        while it serves every kernel, and losing it would end them all. A host that is gone or
        frozen does not answer; one that answers is kept, and its heartbeats taken up again."""
        wait = min(PROBE_SECONDS, self.host_timeout)
        probe = HTTPRequest(view.url.rstrip("/") + "/api", connect_timeout=wait,
                            request_timeout=wait)  # fmt: skip
        seen = view.last_seen
        try:
            # Any HTTP answer will do (599 is tornado's own: no answer came).
            reply = await AsyncHTTPClient().fetch(probe, raise_error=False)
            if reply.code == 599:
                raise reply.error or TimeoutError("no answer")
        except Exception as error:
            if not view.lost and view.last_seen == seen:  # no heartbeat meanwhile either
                log.info("host %s did not answer a probe either: %s", view.name, error)
                self.lose_host(view)
        else:
            if not view.lost:
                log.warning("host %s: no heartbeat for %.0f s, but it answers; kept", view.name,
                            time.time() - view.last_seen)  # fmt: skip
                view.last_seen = time.time()
        finally:
            self.probing.discard(view.id)

    def lose_host(self, view: HostView) -> None:
        log.warning(
            "host %s missed heartbeats for %.0f s: marking it lost", view.name, self.host_timeout
        )
        view.lost = True
        self.reconciler.host_lost(view)
        view.held.clear()
        with self.db() as s:
            host = s.get(Host, view.id)
            if host is not None:
                host.lost = True
                s.commit()
