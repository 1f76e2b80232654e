"""The ledger: one row per GPU hold, the only source of billed seconds and cost.

An interval opens when a kernel's GPUs become held (it reaches `running` with GPUs, first or
again after a resume or a host's return) and closes exactly once when they are released: shut
down, died, its host lost (at the last heartbeat that reported it), its tenant's budget reached,
or suspended. CPU kernels hold no GPU and cost nothing, so they have no intervals.

A row is written once and closed once. Its priced fields (tenant, kernel, host, GPU type and
count, price per GPU-second, start) never change; closing writes `ended` and `end_reason` in an
update guarded on `ended IS NULL`, so of two closers (a heartbeat racing a shutdown now, two
gateway replicas later) exactly one closes it, and the other sees it already closed. Opening
is keyed `{kernel_id}:{n}` (unique): the same hold cannot be opened twice. One row with a
guarded close, rather than a second "closing" row, keeps every total a single scan with no join,
and "closed exactly once" is something the database enforces row by row.

After a gateway crash nothing is rewritten: open intervals of kernels still alive simply go on
(their GPUs were held all along), and those of kernels that died meanwhile close at the kernel's
`last_seen_alive`, which heartbeats keep current.
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any

from sqlalchemy import Float, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from gpupool.wire import MAX_TIME_TEXT, KernelState, iso, parse_iso

from .errors import ApiError
from .metrics import GPU_SECONDS_BILLED
from .shapes import usd_per_gpu_hour
from .store import Kernel, LedgerInterval, Tenant

# Why an interval ended; one word each, as they appear in /api/usage and its CSV.
SHUT_DOWN = "shut_down"  # its owner shut the kernel down
DIED = "died"  # the kernel process ended, or its host no longer runs it
HOST_LOST = "host_lost"  # its host missed heartbeats; closed at the last one
BUDGET = "budget"  # its tenant reached the month's budget
SUSPENDED = "suspended"  # idle: the namespace was saved and the GPUs given back
CULLED = "culled"  # idle, with the `cull` action
RECOVERED = "recovered"  # found open for a kernel that no longer held GPUs, after a restart
REVOKED = "revoked"  # its tenant was revoked by the admin
END_REASONS = (SHUT_DOWN, DIED, HOST_LOST, BUDGET, SUSPENDED, CULLED, RECOVERED, REVOKED)
# States in which a kernel holds its GPUs (DESIGN.md: starting, running, resuming); an open
# interval of a kernel in any other state after a restart is closed by `repair`.
HOLDING_STATES = (KernelState.STARTING, KernelState.RUNNING, KernelState.RESUMING)

CSV_COLUMNS = ("interval", "tenant", "kernel_id", "host_id", "gpu_type", "gpu_count",
               "usd_per_gpu_second", "start", "end", "end_reason", "seconds", "gpu_seconds",
               "cost_usd")  # fmt: skip


def usd(amount: float) -> str:
    """Dollars as people read them: cents when there are any, four decimals below one cent."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"${amount:,.2f}"
    return f"${amount:.4f}"


def read_time(name: str, text: str | None) -> float | None:
    """An ISO 8601 time from a query (`2025-05-01`, `2025-05-01T12:00:00Z`, with an offset or
    without, which means UTC), as a Unix time; 400 naming the parameter when it is not one."""
    if text is None or text == "":
        return None
    example = "such as 2025-05-01 or 2025-05-01T12:00:00Z"
    if len(text) > MAX_TIME_TEXT:
        raise ApiError(400, f"{name} is {len(text)} characters; send an ISO 8601 time, {example}.")
    try:
        return parse_iso(text)
    except ValueError:
        raise ApiError(
            400, f"{name}={text[:40]!r} is not an ISO 8601 time; send one {example}."
        ) from None


def seconds_in(row: LedgerInterval, now: float, since: float | None, until: float | None) -> float:
    """How long the hold lasted within [since, until]; an open one runs until now."""
    end = row.ended if row.ended is not None else now
    if until is not None:
        end = min(end, until)
    start = row.started if since is None else max(row.started, since)
    return max(end - start, 0.0)


def cost_of(row: LedgerInterval, seconds: float) -> float:
    return seconds * row.gpu_count * row.usd_per_gpu_second


def safe_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run as a formula (OWASP's CSV injection advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _spent_statement() -> Any:
    """USD of one tenant's intervals within [since, now], summed by the database: a budget
    check reads one number, not every interval of the month (`Ledger.spent`)."""
    row = LedgerInterval
    since, now = bindparam("since", type_=Float), bindparam("now", type_=Float)
    end = func.coalesce(row.ended, now)
    start = case((row.started > since, row.started), else_=since)
    seconds = case((end > start, end - start), else_=0.0)
    return select(
        func.coalesce(func.sum(seconds * row.gpu_count * row.usd_per_gpu_second), 0.0)
    ).where(row.tenant_id == bindparam("tenant"), or_(row.ended.is_(None), row.ended > since))


SPENT = _spent_statement()  # built once: building a statement cost as much as running it


class Ledger:
    def __init__(self, db: sessionmaker[Session]) -> None:
        self.db = db

    # -- writing: callers pass their session, so a state change and its interval commit as one

    def open(
        self, s: Session, kernel: Kernel, host_id: str | None, when: float
    ) -> LedgerInterval | None:
        """Open the kernel's next interval, unless it holds no GPU or one is open already."""
        if not kernel.gpu_count or not kernel.gpu_type:
            return None
        already = s.scalars(
            select(LedgerInterval).where(
                LedgerInterval.kernel_id == kernel.id, LedgerInterval.ended.is_(None)
            )
        ).first()
        if already is not None:
            return already
        count = s.scalar(
            select(func.count()).select_from(LedgerInterval).where(
                LedgerInterval.kernel_id == kernel.id
            )
        )  # fmt: skip
        row = LedgerInterval(
            key=f"{kernel.id}:{(count or 0) + 1}", tenant_id=kernel.tenant_id,
            kernel_id=kernel.id, host_id=host_id, gpu_type=kernel.gpu_type,
            gpu_count=kernel.gpu_count, usd_per_gpu_second=usd_per_gpu_hour(kernel.gpu_type) / 3600,
            started=when, end_reason="",
        )  # fmt: skip
        s.add(row)
        return row

    def ensure_open(
        self, s: Session, kernels: list[Kernel], host_id: str | None, when: float
    ) -> list[LedgerInterval]:
        """Open an interval from `when` for each GPU kernel that runs with none open (one made
        by a gateway from before the ledger); one query when all is as it should be."""
        holding = {k.id: k for k in kernels if k.gpu_count and k.gpu_type}
        if not holding:
            return []
        have = set(
            s.scalars(
                select(LedgerInterval.kernel_id).where(
                    LedgerInterval.kernel_id.in_(list(holding)), LedgerInterval.ended.is_(None)
                )
            ).all()
        )
        missing = sorted(holding.keys() - have)
        if not missing:
            return []
        # Read again, locked: beside other replicas, a kernel seen running in a host's report a
        # moment ago may have ended since (its interval closed in the same transaction), and
        # must not get a new one.
        still = set(
            s.scalars(
                select(Kernel.id)
                .where(Kernel.id.in_(missing), Kernel.state == KernelState.RUNNING)
                .with_for_update()
            ).all()
        )
        have = set(
            s.scalars(
                select(LedgerInterval.kernel_id).where(
                    LedgerInterval.kernel_id.in_(missing), LedgerInterval.ended.is_(None)
                )
            ).all()
        )
        opened = []
        for kernel_id in sorted(still - have):
            row = self.open(s, holding[kernel_id], host_id, when)
            if row is not None:
                opened.append(row)
        return opened

    def close(self, s: Session, kernel_id: str, when: float, reason: str) -> LedgerInterval | None:
        """Close the kernel's open interval at `when` (never before it opened); None when none
        is open. Call `counted` with the row once the session has committed."""
        assert reason in END_REASONS, reason
        row = s.scalars(
            select(LedgerInterval).where(
                LedgerInterval.kernel_id == kernel_id, LedgerInterval.ended.is_(None)
            )
        ).first()
        if row is None:
            return None
        when = max(when, row.started)
        done = s.execute(
            update(LedgerInterval)
            .where(LedgerInterval.id == row.id, LedgerInterval.ended.is_(None))
            .values(ended=when, end_reason=reason)
            .execution_options(synchronize_session=False)
        )
        if getattr(done, "rowcount", 1) != 1:
            return None  # closed by someone else in between
        row.ended, row.end_reason = when, reason
        return row

    @staticmethod
    def counted(row: LedgerInterval | None) -> None:
        """Add a committed, closed interval to the Prometheus counter."""
        if row is not None and row.ended is not None:
            GPU_SECONDS_BILLED.labels(row.gpu_type).inc((row.ended - row.started) * row.gpu_count)

    def seen_alive(self, s: Session, kernel_ids: list[str], when: float) -> None:
        if kernel_ids:
            s.execute(
                update(Kernel)
                .where(Kernel.id.in_(kernel_ids))
                .values(last_seen_alive=when)
                .execution_options(synchronize_session=False)
            )

    def repair(self, s: Session) -> list[LedgerInterval]:
        """After a restart: an interval left open for a kernel that no longer holds GPUs (a
        crash between two writes) closes when the kernel was last known alive."""
        rows = s.execute(
            select(LedgerInterval, Kernel)
            .join(Kernel, Kernel.id == LedgerInterval.kernel_id)
            .where(LedgerInterval.ended.is_(None), Kernel.state.not_in(HOLDING_STATES))
        ).all()
        closed = []
        for row, kernel in rows:
            when = kernel.last_seen_alive or kernel.ended or row.started
            if kernel.ended is not None:
                when = min(when, kernel.ended)
            done = self.close(s, kernel.id, when, RECOVERED)
            if done is not None:
                closed.append(done)
        return closed

    # -- reading ---------------------------------------------------------------------------

    def billed(self, kernel_id: str, now: float | None = None) -> tuple[float, float]:
        """Seconds billed and their cost in USD, for one kernel, open interval included."""
        return self.holding(kernel_id, now)[:2]

    def holding(
        self, kernel_id: str, now: float | None = None
    ) -> tuple[float, float, float | None]:
        """`billed`, and when the kernel's open interval began (its GPUs were taken), if any."""
        now = time.time() if now is None else now
        with self.db() as s:
            rows = s.scalars(
                select(LedgerInterval).where(LedgerInterval.kernel_id == kernel_id)
            ).all()
        seconds = [seconds_in(r, now, None, None) for r in rows]
        since = next((r.started for r in rows if r.ended is None), None)
        cost = sum(cost_of(r, t) for r, t in zip(rows, seconds, strict=True))
        return sum(seconds), cost, since

    def spent(self, tenant_id: int, since: float, now: float | None = None) -> float:
        """USD the tenant ran up from `since` until now, open intervals included."""
        now = time.time() if now is None else now
        with self.db() as s:
            spent = s.execute(SPENT, {"tenant": tenant_id, "since": since, "now": now}).scalar()
        return float(spent or 0.0)

    def open_rates(self) -> dict[int, float]:
        """USD per second each tenant's open intervals cost now."""
        with self.db() as s:
            rows = s.scalars(select(LedgerInterval).where(LedgerInterval.ended.is_(None))).all()
        rates: dict[int, float] = {}
        for r in rows:
            rates[r.tenant_id] = rates.get(r.tenant_id, 0.0) + r.gpu_count * r.usd_per_gpu_second
        return rates

    def open_gpu_seconds(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        with self.db() as s:
            rows = s.scalars(select(LedgerInterval).where(LedgerInterval.ended.is_(None))).all()
        totals: dict[str, float] = {}
        for r in rows:
            totals[r.gpu_type] = totals.get(r.gpu_type, 0.0) + max(now - r.started, 0) * r.gpu_count
        return totals

    def report(
        self,
        tenant_id: int | None,
        since: float | None = None,
        until: float | None = None,
        kernel_id: str | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Intervals that overlap [since, until], each counted within it, with totals per GPU
        type; one tenant's, or every tenant's (for `gpupool usage` on the gateway's machine)."""
        now = time.time() if now is None else now
        query = select(LedgerInterval, Tenant.name).join(
            Tenant, Tenant.id == LedgerInterval.tenant_id
        )
        if tenant_id is not None:
            query = query.where(LedgerInterval.tenant_id == tenant_id)
        if kernel_id is not None:
            query = query.where(LedgerInterval.kernel_id == kernel_id)
        if since is not None:
            query = query.where(or_(LedgerInterval.ended.is_(None), LedgerInterval.ended > since))
        if until is not None:
            query = query.where(LedgerInterval.started < until)
        with self.db() as s:
            rows = s.execute(query.order_by(LedgerInterval.started, LedgerInterval.id)).all()
        intervals = []
        totals: dict[str, dict[str, float]] = {}
        all_gpu_seconds = all_cost = 0.0
        for row, tenant_name in rows:
            seconds = seconds_in(row, now, since, until)
            cost = cost_of(row, seconds)
            intervals.append({
                "interval": row.key, "tenant": tenant_name, "kernel_id": row.kernel_id,
                "host_id": row.host_id, "gpu_type": row.gpu_type, "gpu_count": row.gpu_count,
                "usd_per_gpu_second": row.usd_per_gpu_second,
                "start": iso(row.started), "end": iso(row.ended) if row.ended is not None else None,
                "end_reason": row.end_reason, "open": row.ended is None,
                "seconds": round(seconds, 3), "gpu_seconds": round(seconds * row.gpu_count, 3),
                "cost_usd": round(cost, 6),
            })  # fmt: skip
            entry = totals.setdefault(
                row.gpu_type, {"intervals": 0, "gpu_seconds": 0.0, "cost_usd": 0.0}
            )
            entry["intervals"] += 1
            entry["gpu_seconds"] += seconds * row.gpu_count
            entry["cost_usd"] += cost
            all_gpu_seconds += seconds * row.gpu_count
            all_cost += cost
        return {
            "since": iso(since) if since is not None else None,
            "until": iso(until) if until is not None else None,
            "now": iso(now),
            "intervals": intervals,
            "totals": {
                t: {"intervals": int(v["intervals"]), "gpu_seconds": round(v["gpu_seconds"], 3),
                    "cost_usd": round(v["cost_usd"], 6)}
                for t, v in sorted(totals.items())
            },
            "total": {"intervals": len(intervals), "gpu_seconds": round(all_gpu_seconds, 3),
                      "cost_usd": round(all_cost, 6)},
        }  # fmt: skip


def to_csv(report: dict[str, Any]) -> str:
    """The report's intervals as CSV with a header row; text cells cannot start a formula."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for i in report["intervals"]:
        cells = [i["interval"], i["tenant"], i["kernel_id"], i["host_id"] or "", i["gpu_type"],
                 i["gpu_count"], i["usd_per_gpu_second"], i["start"], i["end"] or "",
                 i["end_reason"], i["seconds"], i["gpu_seconds"], i["cost_usd"]]  # fmt: skip
        writer.writerow([safe_cell(c) for c in cells])
    return out.getvalue()
