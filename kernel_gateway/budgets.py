"""Budgets: what a tenant may spend on GPUs per calendar month (UTC), in US dollars.

At the limit, new GPU holds are refused (HTTP 402, with the numbers) and the tenant's running
GPU kernels stop billing; CPU kernels cost nothing and still start. The spend counts open
intervals up to now, so a budget is reached while a kernel runs, not only when it ends.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from .errors import ApiError
from .ledger import Ledger, usd
from .store import LedgerInterval, Tenant

MAX_BUDGET_USD = 1_000_000_000
WATCH_SECONDS = 1.0  # the longest the watcher sleeps while budgeted kernels run
WATCH_MIN_SECONDS = 0.05


def read_budget(value: Any) -> float | None:
    """A budget from JSON or the command line: dollars from 0 up, or None for no budget."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(
            400, f"budget_usd must be a number of US dollars per month (or null for no budget); "
            f"got {str(value)[:40]!r}.",
        )  # fmt: skip
    if not 0 <= value <= MAX_BUDGET_USD:  # NaN fails too; a huge int is compared, not converted
        shown = f"{value:.3g}" if isinstance(value, float) else f"{str(value)[:20]}"
        raise ApiError(
            400, f"budget_usd is {shown}; it must be from 0 to {MAX_BUDGET_USD:,} US dollars "
            "per month, or null for no budget.",
        )  # fmt: skip
    return float(value)


def month_start(now: float) -> float:
    day = datetime.fromtimestamp(now, timezone.utc)
    return datetime(day.year, day.month, 1, tzinfo=timezone.utc).timestamp()


def month_name(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%B %Y")


class Budgets:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def spent_this_month(self, tenant_id: int, now: float | None = None) -> float:
        now = time.time() if now is None else now
        return self.ledger.spent(tenant_id, month_start(now), now)

    def summary(self, tenant: Tenant, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "month": month_name(now),
            "budget_usd": tenant.budget_usd,
            "spent_this_month_usd": round(self.spent_this_month(tenant.id, now), 6),
        }

    def refusal(self, tenant: Tenant, now: float | None = None) -> str | None:
        """Why the tenant may hold no more GPUs this month, or None while it may."""
        if tenant.budget_usd is None:
            return None
        now = time.time() if now is None else now
        spent = self.spent_this_month(tenant.id, now)
        if spent < tenant.budget_usd:
            return None
        return (
            f"tenant {tenant.name} has spent {usd(spent)} of its {usd(tenant.budget_usd)} GPU "
            f"budget for {month_name(now)}; no GPU can be held until an admin raises the budget "
            f"(PATCH /api/admin/tenants/{tenant.name} with budget_usd) or the month ends. "
            "CPU kernels (python3) still start."
        )

    def due(self, now: float | None = None) -> tuple[list[Tenant], float]:
        """Tenants at their limit that still hold GPUs, and how long the watcher may sleep
        before the next one could reach its limit (at the rate its open intervals cost)."""
        now = time.time() if now is None else now
        rates = self.ledger.open_rates()
        if not rates:
            return [], WATCH_SECONDS
        with self.ledger.db() as s:
            tenants = s.scalars(
                select(Tenant).where(
                    Tenant.budget_usd.is_not(None),
                    Tenant.id.in_(
                        select(LedgerInterval.tenant_id).where(LedgerInterval.ended.is_(None))
                    ),
                )
            ).all()
        due, wait = [], WATCH_SECONDS
        for tenant in tenants:
            assert tenant.budget_usd is not None
            left = tenant.budget_usd - self.spent_this_month(tenant.id, now)
            if left <= 0:
                due.append(tenant)
            elif rates.get(tenant.id):
                wait = min(wait, left / rates[tenant.id])
        return due, max(wait, WATCH_MIN_SECONDS)
