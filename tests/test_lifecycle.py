"""The kernel state machine (kernel_gateway/lifecycle.py) on a real SQLite file: each move writes
the row, the ledger and the tokens together, a move it lacks is refused before anything is
written, and the table in docs/architecture.md is the table in the code."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from gpupool.wire import KernelState
from kernel_gateway.kernels import GatewayKernels
from kernel_gateway.ledger import Ledger
from kernel_gateway.lifecycle import MOVES, TRANSITIONS, IllegalMove, Lifecycle
from kernel_gateway.pool import Pool
from kernel_gateway.store import Host, Kernel, LedgerInterval, Tenant, Token, open_store
from kernel_gateway.tokens import digest

ROOT = Path(__file__).resolve().parent.parent
Q, S, R = KernelState.QUEUED, KernelState.STARTING, KernelState.RUNNING
SUSP, DEAD, DEL = KernelState.SUSPENDED, KernelState.DEAD, KernelState.DELETED


def lifecycle_with(tmp_path: Path, state: KernelState) -> Lifecycle:
    """A store with one tenant, one host, and kernel "k1" (one H100) in `state`, with a token."""
    db = open_store(str(tmp_path / "gateway.db"))
    with db() as s:
        tenant = Tenant(name="a")
        s.add(tenant)
        s.add(Host(id="h1", name="box", url="http://127.0.0.1:9", token="t", gpus=[]))
        s.flush()
        s.add(Kernel(id="k1", tenant_id=tenant.id, name="python3-gpu-h100-x1", gpu_type="H100",
                     gpu_count=1, state=state, host_id="h1"))  # fmt: skip
        s.add(Token(tenant_id=tenant.id, digest=digest("x" * 40), prefix="xxxxxx", kernel_id="k1"))
        s.commit()
    return Lifecycle(db, Ledger(db))


def row(life: Lifecycle) -> Kernel:
    with life.db() as s:
        kernel = s.get(Kernel, "k1")
    assert kernel is not None
    return kernel


def intervals(life: Lifecycle) -> list[LedgerInterval]:
    with life.db() as s:
        return list(s.query(LedgerInterval).order_by(LedgerInterval.id).all())


def tokens(life: Lifecycle) -> int:
    with life.db() as s:
        return s.query(Token).count()


def count(left: KernelState, to: KernelState) -> float:
    return TRANSITIONS.labels(left.value, to.value)._value.get()


def test_running_opens_the_ledger_and_suspending_closes_it_with_the_tokens(tmp_path: Path) -> None:
    life = lifecycle_with(tmp_path, S)
    before = count(S, R)
    held = time.time() - 5
    moved = life.move("k1", R, (S,), at=held, host_kernel_id="hk1", gpus=["GPU-1"])
    assert moved is not None and moved.state == R and moved.host_kernel_id == "hk1"
    assert row(life).last_seen_alive is not None and count(S, R) == before + 1
    [opened] = intervals(life)
    assert (opened.started, opened.ended) == (held, None)

    life.move("k1", SUSP, (R,), at=held + 3, closing="suspended", gpus=[])
    [closed] = intervals(life)
    assert (closed.ended, closed.end_reason) == (held + 3, "suspended")
    assert row(life).state == SUSP and row(life).ended is None  # suspended is not ended
    assert tokens(life) == 0


def test_a_death_ends_the_kernel_at_its_close_and_a_lost_host_keeps_its_token(
    tmp_path: Path,
) -> None:
    life = lifecycle_with(tmp_path, S)
    start = time.time() - 10
    life.move("k1", R, (S,), at=start)
    life.move("k1", DEAD, (R,), at=start - 100, closing="host_lost", reason="host away")
    kernel = row(life)
    # never billed before it started: the close (and `ended`) is clamped to the interval's start
    assert kernel.state == DEAD and kernel.ended == start and kernel.reason == "host away"
    assert tokens(life) == 1  # the same process may come back with its host
    life.move("k1", R, (DEAD,), reason="")  # it did: a new interval from now
    assert row(life).ended is None and [i.ended is None for i in intervals(life)] == [False, True]
    life.move("k1", DEL, (R,), closing="shut_down")
    assert row(life).state == DEL and row(life).ended is not None and tokens(life) == 0
    assert all(i.ended is not None for i in intervals(life))


def test_a_move_in_another_state_by_now_writes_nothing(tmp_path: Path) -> None:
    life = lifecycle_with(tmp_path, DEL)  # shut down while its start was under way
    before = count(S, R)
    assert life.move("k1", R, (S,), host_kernel_id="hk1") is None
    assert row(life).state == DEL and row(life).host_kernel_id is None
    assert intervals(life) == [] and count(S, R) == before
    assert life.move("missing", Q, (SUSP,)) is None


@pytest.mark.parametrize(
    ("left", "to", "closing"),
    [(SUSP, DEAD, "died"), (DEL, Q, None), (Q, R, None), (DEAD, Q, None), (R, Q, None)],
)
def test_a_move_the_machine_lacks_is_refused_before_anything_is_written(
    tmp_path: Path, left: KernelState, to: KernelState, closing: str | None
) -> None:
    life = lifecycle_with(tmp_path, left)
    with pytest.raises(IllegalMove, match=f"from {left.value} to {to.value}"):
        life.move("k1", to, (left,), closing=closing)
    assert row(life).state == left and tokens(life) == 1


def test_giving_gpus_back_needs_the_ledgers_reason(tmp_path: Path) -> None:
    life = lifecycle_with(tmp_path, R)
    for to in (SUSP, DEAD, DEL):
        with pytest.raises(IllegalMove, match="reason"):
            life.move("k1", to, (R,))
    assert row(life).state == R and tokens(life) == 1


def test_the_documented_table_is_the_table_in_the_code() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("### Kernel state machine", 1)[1].split("\n### ", 1)[0]
    documented: set[tuple[str, str]] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith(("`", "none")):
            continue
        for left in re.findall(r"`([a-z]+)`", cells[0]):
            for to in re.findall(r"`([a-z]+)`", cells[1]):
                documented.add((left, to))
    coded = {(left.value, to.value) for left, tos in MOVES.items() for to in tos}
    assert documented == coded, (
        f"in the docs only: {sorted(documented - coded)}; in the code only: "
        f"{sorted(coded - documented)}"
    )


def test_the_queue_is_read_from_the_database_in_order_of_joining(tmp_path: Path) -> None:
    """First come, first served across gateways on one database: a resume joins at the end, a
    start its host refused (409) goes back to the place it had."""
    db = open_store(str(tmp_path / "gateway.db"))
    with db() as s:
        tenant = Tenant(name="a")
        s.add(tenant)
        s.flush()
        for name, state, joined in (("k1", Q, 1.0), ("k2", Q, 2.0), ("k3", SUSP, 0.5)):
            s.add(Kernel(id=name, tenant_id=tenant.id, name="python3-gpu-h100-x1",
                         gpu_type="H100", gpu_count=1, state=state, queued_at=joined))  # fmt: skip
        s.commit()
    kernels, other = GatewayKernels(db, Pool()), GatewayKernels(db, Pool())
    assert kernels.queued() == ["k1", "k2"]
    kernels.lifecycle.move("k3", Q, (SUSP,))  # a suspended kernel's next cell
    assert kernels.queued() == ["k1", "k2", "k3"]
    kernels.lifecycle.move("k1", S, (Q,))
    assert kernels.queued() == ["k2", "k3"] and kernels.queued("A10G") == []
    kernels.lifecycle.move("k1", Q, (S,))  # its host answered 409: stale view of its GPUs
    assert kernels.queued() == ["k1", "k2", "k3"] == other.queued()  # another replica's view
    assert kernels.queue_position(kernels.row("k3")) == 3
