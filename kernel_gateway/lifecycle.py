"""A pool kernel's states, the moves allowed between them, and the one function that makes a move.

`Lifecycle.move` is the only writer of `kernels.state`: in one transaction it writes the row's new
state with the caller's values, opens or closes the kernel's ledger interval and deletes the
kernel's own tokens as the new state requires; after the commit it counts the move in
`gpupool_kernel_transitions_total` and the billed seconds in `gpupool_gpu_seconds_billed`.
docs/architecture.md ("Kernel state machine") says which code makes each move, and why."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

from prometheus_client import Counter
from sqlalchemy import delete, or_, update
from sqlalchemy.orm import Session, sessionmaker

from gpupool.wire import ENDED, KernelState

from .ledger import HOST_LOST, Ledger
from .metrics import EVENTS
from .store import Kernel, Token

QUEUED, STARTING, RUNNING = KernelState.QUEUED, KernelState.STARTING, KernelState.RUNNING
SUSPENDED, DEAD, DELETED = KernelState.SUSPENDED, KernelState.DEAD, KernelState.DELETED

# Row state -> the states it may move to. `resuming` is never a row's state: the kernel model
# shows a queued or starting row with a checkpoint as resuming.
MOVES: Mapping[KernelState, frozenset[KernelState]] = {
    QUEUED: frozenset({STARTING, SUSPENDED, DEAD, DELETED}),
    STARTING: frozenset({QUEUED, RUNNING, DEAD, DELETED}),
    RUNNING: frozenset({SUSPENDED, DEAD, DELETED}),
    SUSPENDED: frozenset({QUEUED, DELETED}),
    DEAD: frozenset({RUNNING, DELETED}),  # running again: its lost host came back with it
    DELETED: frozenset(),
}
RELEASING = (SUSPENDED, DEAD, DELETED)  # moving into these gives the GPUs back

TRANSITIONS = Counter(
    "gpupool_kernel_transitions",
    "Kernel state changes written, by the state left and the state entered.",
    ["from_state", "to_state"],
    registry=EVENTS,
)


class IllegalMove(RuntimeError):
    """A caller asked for a move the state machine does not have: a bug, never a user's error."""


class Lifecycle:
    def __init__(self, db: sessionmaker[Session], ledger: Ledger) -> None:
        self.db = db
        self.ledger = ledger

    def move(
        self,
        kernel_id: str,
        to: KernelState,
        expect: Collection[KernelState],
        *,
        at: float | None = None,
        closing: str | None = None,
        only_if: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> Kernel | None:
        """Move the kernel to `to` if its row is in one of the states `expect`, setting `values`
        on the row; the row as written, or None (and nothing written) when it is in another
        state by now (another task moved it first).

        `at` (default now) is when the move happened for billing: entering running opens an
        interval from it; entering suspended, dead or deleted closes the open one, if any, at
        it with the ledger reason `closing`, and sets `ended` when the kernel ends.

        `only_if`: columns the row must also have (a replica's start acts only while the row is
        still its own attempt: its host, its lease), else nothing is written either."""
        to = KernelState(to)
        for state in expect:
            if to not in MOVES[state]:
                raise IllegalMove(f"a kernel cannot move from {state} to {to}")
        if to in RELEASING and closing is None:
            raise IllegalMove(f"a move to {to} needs the ledger's reason for closing")
        now = time.time()
        at = now if at is None else min(at, now)
        with self.db() as s:
            # Locked until the commit (PostgreSQL; SQLite has one writer anyway): two replicas
            # moving one kernel at once would otherwise both read the old state and both write.
            row = s.get(Kernel, kernel_id, with_for_update=True)
            if row is None or row.state not in expect:
                return None
            if only_if and any(getattr(row, key) != value for key, value in only_if.items()):
                return None
            left = KernelState(row.state)
            row.lease_owner = row.lease_until = None  # a lease is for one job in one state
            for key, value in values.items():
                setattr(row, key, value)
            if to == QUEUED and left == SUSPENDED:
                row.queued_at = now  # a resume joins the queue at its end
            row.state = to
            closed = None
            if to == RUNNING:
                row.last_seen_alive = now
                row.ended = None
                self.ledger.open(s, row, row.host_id, at)
            elif closing is not None:
                closed = self.ledger.close(s, kernel_id, at, closing)
                if to in ENDED and left not in ENDED:
                    # billing ends when the kernel was last seen alive, never before it started
                    row.ended = closed.ended if closed is not None else at
                if closing != HOST_LOST:  # a host that comes back brings the same process back
                    s.execute(delete(Token).where(Token.kernel_id == kernel_id))
            s.commit()
        TRANSITIONS.labels(left.value, to.value).inc()
        self.ledger.counted(closed)
        return row

    def claim(self, kernel_id: str, owner: str, seconds: float, state: KernelState) -> bool:
        """Take the kernel's lease for `seconds` if it is in `state` and no other replica holds
        a lease on it that has not expired: True when `owner` holds it now. One conditional
        update, so of two replicas asking at once exactly one gets it."""
        now = time.time()
        with self.db() as s:
            taken: Any = s.execute(
                update(Kernel)
                .where(
                    Kernel.id == kernel_id,
                    Kernel.state == state,
                    or_(
                        Kernel.lease_owner.is_(None),
                        Kernel.lease_owner == owner,
                        Kernel.lease_until < now,
                    ),
                )
                .values(lease_owner=owner, lease_until=now + seconds)
            )
            s.commit()
        return bool(taken.rowcount)

    def renew(self, owner: str, seconds: float) -> None:
        """Extend every lease `owner` holds: it is alive and still at work."""
        with self.db() as s:
            s.execute(
                update(Kernel)
                .where(Kernel.lease_owner == owner)
                .values(lease_until=time.time() + seconds)
            )
            s.commit()

    def release(self, kernel_id: str, owner: str, state: KernelState) -> None:
        """Give up `owner`'s lease of the kernel while it is still in `state` (a move to another
        state ended that lease already, and a later one may be the owner's again)."""
        with self.db() as s:
            s.execute(
                update(Kernel)
                .where(Kernel.id == kernel_id, Kernel.lease_owner == owner, Kernel.state == state)
                .values(lease_owner=None, lease_until=None)
            )
            s.commit()
