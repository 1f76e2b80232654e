"""The ledger: an interval per GPU hold, closed exactly once; billed seconds against the wall
time a GPU was held, across a gateway killed mid-interval and a host killed mid-interval.
Real gateway and host processes on loopback with fake GPUs, real SQLite files."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import Gateway, HostAgent, start_gateway, start_host

from kernel_gateway.ledger import Ledger, to_csv
from kernel_gateway.store import Kernel, LedgerInterval, Tenant, open_store

H100_X1 = "python3-gpu-h100-x1"
HOST_TIMEOUT = 2.0
HEARTBEAT = 0.5


# -- the ledger on its own, on a real SQLite file -----------------------------------------------


def ledger_with_kernel(tmp_path: Path, gpu_count: int = 1) -> tuple[Ledger, Kernel]:
    db = open_store(str(tmp_path / "gateway.db"))
    with db() as s:
        tenant = Tenant(name="a")
        s.add(tenant)
        s.flush()
        kernel = Kernel(id="k1", tenant_id=tenant.id, name="x", gpu_type="H100",
                        gpu_count=gpu_count, state="running")  # fmt: skip
        s.add(kernel)
        s.commit()
    return Ledger(db), kernel


def test_an_interval_opens_once_and_closes_exactly_once(tmp_path: Path) -> None:
    ledger, kernel = ledger_with_kernel(tmp_path, gpu_count=2)
    with ledger.db() as s:
        first = ledger.open(s, kernel, "h", 1000.0)
        assert ledger.open(s, kernel, "h", 1001.0) is first  # already open: the same hold
        s.commit()
    assert first is not None and first.key == "k1:1"
    with ledger.db() as s:
        closed = ledger.close(s, "k1", 1010.0, "shut_down")
        s.commit()
    with ledger.db() as s:
        assert ledger.close(s, "k1", 1020.0, "died") is None  # a second closer finds none open
        s.commit()
    assert closed is not None and closed.ended == 1010.0
    with ledger.db() as s:
        [row] = s.query(LedgerInterval).all()
    assert (row.ended, row.end_reason) == (1010.0, "shut_down")
    assert ledger.billed("k1", now=5000.0) == pytest.approx((10.0, 20 * 3.95 / 3600))
    # Held again (resumed, or its host came back): a new row with the next key.
    with ledger.db() as s:
        again = ledger.open(s, kernel, "h", 2000.0)
        # A close is never before the open: a stale "last seen alive" bills nothing, not less.
        assert again is not None and ledger.close(s, "k1", 1990.0, "host_lost") is again
        s.commit()
    assert again.key == "k1:2" and again.ended == 2000.0
    assert ledger.billed("k1", now=5000.0)[0] == pytest.approx(10.0)


def test_a_cpu_kernel_has_no_interval(tmp_path: Path) -> None:
    ledger, kernel = ledger_with_kernel(tmp_path, gpu_count=0)
    with ledger.db() as s:
        assert ledger.open(s, kernel, "h", 1000.0) is None
    assert ledger.billed("k1") == (0, 0)


def test_an_interval_left_open_for_an_ended_kernel_closes_when_it_was_last_seen(
    tmp_path: Path,
) -> None:
    ledger, kernel = ledger_with_kernel(tmp_path)
    with ledger.db() as s:
        ledger.open(s, kernel, "h", 1000.0)
        row = s.get(Kernel, "k1")
        assert row is not None
        row.state, row.last_seen_alive, row.ended = "dead", 1004.0, 1009.0  # a crash between
        s.commit()
    with ledger.db() as s:
        [repaired] = ledger.repair(s)
        s.commit()
    assert (repaired.ended, repaired.end_reason) == (1004.0, "recovered")


def test_a_report_counts_each_interval_within_the_window(tmp_path: Path) -> None:
    ledger, kernel = ledger_with_kernel(tmp_path)
    with ledger.db() as s:
        ledger.open(s, kernel, "h", 1000.0)
        ledger.close(s, "k1", 1100.0, "suspended")
        ledger.open(s, kernel, "h", 1200.0)  # still open
        s.commit()
    report = ledger.report(None, since=1050.0, until=1250.0, now=1300.0)
    assert [i["seconds"] for i in report["intervals"]] == [50.0, 50.0]
    assert [i["open"] for i in report["intervals"]] == [False, True]
    assert report["totals"]["H100"]["gpu_seconds"] == 100.0
    assert report["total"]["cost_usd"] == pytest.approx(100 * 3.95 / 3600, abs=1e-6)
    assert ledger.report(None, since=1100.0, now=1300.0)["total"]["intervals"] == 1
    assert ledger.report(None, until=1000.0, now=1300.0)["intervals"] == []


def test_what_was_spent_is_summed_by_the_database_as_the_report_counts_it(
    tmp_path: Path,
) -> None:
    """`Ledger.spent` (budgets) is one SQL sum; the report counts each interval in Python.
    Intervals before, across and after `since`, and an open one, come to the same USD."""
    ledger, kernel = ledger_with_kernel(tmp_path, gpu_count=2)
    with ledger.db() as s:
        for start, end in ((900.0, 950.0), (1000.0, 1100.0), (1150.0, 1160.0)):
            ledger.open(s, kernel, "h", start)
            ledger.close(s, "k1", end, "suspended")
        ledger.open(s, kernel, "h", 1200.0)  # still open
        s.commit()
    tenant_id = kernel.tenant_id
    for since in (0.0, 950.0, 1050.0, 1155.0, 1250.0, 1400.0):
        counted = ledger.report(tenant_id, since=since, until=1300.0, now=1300.0)
        spent = ledger.spent(tenant_id, since, now=1300.0)
        assert spent == pytest.approx(counted["total"]["cost_usd"], abs=1e-6), since
    assert ledger.spent(tenant_id + 1, 0.0, now=1300.0) == 0.0  # another tenant spent nothing


def test_csv_cells_cannot_start_a_formula() -> None:
    evil = '=HYPERLINK("http://x")'
    interval = {"interval": "k:1", "tenant": "a", "kernel_id": "k", "host_id": "-2+3",
                "gpu_type": evil, "gpu_count": 1, "usd_per_gpu_second": 0.001,
                "start": "2025-01-01T00:00:00.000000Z", "end": None, "end_reason": "@x",
                "seconds": 1.0, "gpu_seconds": 1.0, "cost_usd": 0.001}  # fmt: skip
    lines = to_csv({"intervals": [interval]}).splitlines()
    assert lines[0].startswith("interval,tenant,kernel_id,host_id,gpu_type,gpu_count,")
    assert "'=HYPERLINK" in lines[1] and ",'-2+3," in lines[1] and ",'@x," in lines[1]


def test_a_database_from_before_the_ledger_gains_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # the tenants table as the first gateway made it
        old.execute(
            "CREATE TABLE tenants (id INTEGER PRIMARY KEY, name VARCHAR(24) UNIQUE, "
            "max_gpus INTEGER, max_kernels INTEGER, created FLOAT, revoked BOOLEAN)"
        )
        old.execute("INSERT INTO tenants VALUES (1, 'old', NULL, NULL, 0, 0)")
    db = open_store(str(path))
    with db() as s:
        [tenant] = s.query(Tenant).all()
    assert (tenant.name, tenant.budget_usd) == ("old", None)


# -- real processes ------------------------------------------------------------------------------


@pytest.fixture
def started() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.stop()


def gateway(tmp_path: Path, started: list[Any], port: int = 0) -> Gateway:
    gw = start_gateway(tmp_path, "--host-timeout", str(HOST_TIMEOUT), state=tmp_path / "gw",
                       port=port)  # fmt: skip
    started.append(gw)
    return gw


def join(tmp_path: Path, started: list[Any], gw: Gateway) -> HostAgent:
    folder = tmp_path / f"host-{len(started)}"
    folder.mkdir()
    agent = start_host(
        folder, "--fake-gpus", "H100:2", "--no-isolate", "--gateway", gw.url,
        f"--join-token={gw.join_token}", "--heartbeat-seconds", str(HEARTBEAT),
    )  # fmt: skip
    started.append(agent)
    gw.wait_for(lambda: host_up(gw), 15, "the host to register")
    return agent


def host_up(gw: Gateway) -> bool:
    reply = gw.call("GET", "/api/hosts", token=gw.admin_token)
    return reply.status == 200 and any(not h["lost"] for h in reply.body)


def usage(gw: Gateway, kernel_id: str) -> list[dict[str, Any]]:
    reply = gw.call("GET", f"/api/usage?kernel={kernel_id}")
    assert reply.status == 200, reply.body
    return list(reply.body["intervals"])


def state_of(gw: Gateway, kernel_id: str) -> str:
    reply = gw.call("GET", f"/api/kernels/{kernel_id}")
    assert reply.status == 200, reply.body
    return str(reply.body["gpupool"]["state"])


def on_host(agent: HostAgent) -> set[str]:
    return {k["id"] for k in agent.call("GET", "/api/kernels").body
            if k["execution_state"] != "dead"}  # fmt: skip


def start_kernel(gw: Gateway) -> tuple[str, float, float]:
    """A running H100 kernel, with the times just before asking and just after the answer."""
    asked = time.time()
    model = gw.create(name=H100_X1)
    assert model["gpupool"]["state"] == "running", model
    return str(model["id"]), asked, time.time()


def stamp(text: str) -> float:
    from datetime import datetime, timezone

    when = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=timezone.utc).timestamp()


def test_billed_seconds_are_the_seconds_held(tmp_path: Path, started: list[Any]) -> None:
    gw = gateway(tmp_path, started)
    join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    kernel_id, asked, running = start_kernel(gw)
    time.sleep(1.0)
    live = gw.call("GET", f"/api/kernels/{kernel_id}").body["gpupool"]
    assert 0.9 <= live["billed_seconds"] <= time.time() - asked, live  # live, from the ledger
    assert live["cost_usd"] == pytest.approx(live["billed_seconds"] * 3.95 / 3600, rel=0.01)
    time.sleep(1.0)
    deleting = time.time()
    assert gw.call("DELETE", f"/api/kernels/{kernel_id}").status == 204
    deleted = time.time()

    [interval] = usage(gw, kernel_id)
    assert interval["end_reason"] == "shut_down" and interval["open"] is False
    assert interval["gpu_type"] == "H100" and interval["gpu_count"] == 1
    assert interval["interval"] == f"{kernel_id}:1"
    held = deleted - asked  # the most it can have been held, seen from here
    assert interval["seconds"] <= held, (interval, held)
    # The least: from when it was seen running to when its shutdown was asked. (How long the
    # start took is the machine's load, not billing, so no bound is put on that gap.)
    assert interval["seconds"] >= deleting - running, (interval, deleting - running)
    # It stays billed after it is gone, and no longer grows.
    time.sleep(0.3)
    assert usage(gw, kernel_id) == [interval]


@pytest.mark.slow
def test_a_gateway_killed_mid_interval_leaves_no_gap_and_no_double_count(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    token = gw.token = gw.tenant("a")
    survivor, asked, running = start_kernel(gw)
    before = on_host(agent)
    dying, _, _ = start_kernel(gw)
    [dying_on_host] = on_host(agent) - before
    time.sleep(1.0)
    port = urlsplit(gw.url).port
    assert port

    gw.proc.kill()  # SIGKILL: nothing is flushed or closed
    gw.proc.wait(10)
    killed = time.time()
    # While the gateway is away, one kernel ends on its host; the other keeps its GPU.
    assert agent.call("DELETE", f"/api/kernels/{dying_on_host}").status == 204
    time.sleep(1.0)
    again = gateway(tmp_path, started, port=port)
    again.token = token
    again.wait_for(lambda: host_up(again), 10, "the host")
    again.wait_for(lambda: state_of(again, dying) == "dead", 10, "the lost kernel to be seen dead")
    assert state_of(again, survivor) == "running"
    time.sleep(0.5)
    deleting = time.time()
    assert again.call("DELETE", f"/api/kernels/{survivor}").status == 204
    deleted = time.time()

    # The survivor: one interval across the restart, as long as it was held (at most from the
    # ask to the delete's answer, at least from being seen running to the delete's ask).
    [interval] = usage(again, survivor)
    assert interval["end_reason"] == "shut_down"
    assert deleting - running <= interval["seconds"] <= deleted - asked, (interval, asked)
    # The one that ended unseen: billed until the gateway last saw it alive, not the downtime.
    [ended] = usage(again, dying)
    assert ended["end_reason"] == "died"
    assert killed - 2 * HEARTBEAT - 0.3 <= stamp(ended["end"]) <= killed, (ended, killed)
    # Nothing counted twice: the totals are the two intervals.
    everything = again.call("GET", "/api/usage").body
    assert everything["total"]["intervals"] == 2
    assert everything["total"]["gpu_seconds"] == pytest.approx(
        interval["gpu_seconds"] + ended["gpu_seconds"], abs=0.002
    )


def test_a_killed_host_ends_billing_at_its_last_heartbeat(
    tmp_path: Path, started: list[Any]
) -> None:
    gw = gateway(tmp_path, started)
    agent = join(tmp_path, started, gw)
    gw.token = gw.tenant("a")
    kernel_id, _, _ = start_kernel(gw)
    time.sleep(1.0)
    children = psutil.Process(agent.proc.pid).children(recursive=True)
    agent.proc.kill()
    killed = time.time()
    for child in children:  # each kernel leads its own session
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    gw.wait_for(lambda: state_of(gw, kernel_id) == "dead", HOST_TIMEOUT + 4, "the kernel to die")
    noticed = time.time()

    [interval] = usage(gw, kernel_id)
    assert interval["end_reason"] == "host_lost"
    end = stamp(interval["end"])
    assert killed - HEARTBEAT - 0.3 <= end <= killed, (interval, killed)
    # The host timeout the gateway waited before calling it lost is not billed.
    assert noticed - end >= HOST_TIMEOUT - 0.1
    time.sleep(0.3)
    assert usage(gw, kernel_id) == [interval]
