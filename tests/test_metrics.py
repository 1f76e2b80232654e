"""/metrics is read from the gateway at scrape time (`GatewayCollector`): what a scrape shows is
what the readings say then, nothing left over from an earlier scrape. The route itself (tokens,
content type, numbers of a real pool) is tested in test_gateway_queue.py and
security/test_gateway_api.py."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kernel_gateway.metrics import KERNEL_STATES, Readings, gateway_registry, render_metrics


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_a_scrape_reads_the_gateway_as_it_is_then():
    pool = {"H100": {"total": 4, "free": 1, "memory": 80, "most": 4}}
    counts = {"running": 3, "queued": 2, "deleted": 7}
    queue = ["a", "b"]
    registry = gateway_registry(
        Readings(
            kernel_counts=lambda: counts,
            queue_length=lambda: len(queue),
            gpu_types=lambda: pool,
            open_gpu_seconds=lambda: {"H100": 12.5},
        )
    )
    first = samples(render_metrics(registry))
    for state in KERNEL_STATES:
        assert first[("gpupool_kernels", (("state", state),))] == counts.get(state, 0)
    assert ("gpupool_kernels", (("state", "deleted"),)) not in first
    assert first[("gpupool_gpus", (("gpu_type", "H100"), ("use", "free")))] == 1
    assert first[("gpupool_gpus", (("gpu_type", "H100"), ("use", "used")))] == 3
    assert first[("gpupool_queue_length", ())] == 2
    assert first[("gpupool_gpu_seconds_open", (("gpu_type", "H100"),))] == 12.5
    assert ("gpupool_gpu_seconds_billed_total", (("gpu_type", "H100"),)) in first
    assert ("gpupool_kernel_start_seconds_count", ()) in first

    # The H100 host is lost, an A10G one joins, the queue empties: nothing stale stays.
    pool.clear()
    pool["A10G"] = {"total": 2, "free": 2, "memory": 24, "most": 2}
    queue.clear()
    counts.clear()
    second = samples(render_metrics(registry))
    assert not [key for key in second if key[0] == "gpupool_gpus" and "H100" in str(key)]
    assert second[("gpupool_gpus", (("gpu_type", "A10G"), ("use", "used")))] == 0
    assert second[("gpupool_queue_length", ())] == 0
    assert second[("gpupool_kernels", (("state", "running"),))] == 0
    assert ("gpupool_gpu_seconds_billed_total", (("gpu_type", "A10G"),)) in second


def test_two_gateways_in_one_process_each_show_their_own_pool():
    def readings(free: int) -> Readings:
        return Readings(
            kernel_counts=dict,
            queue_length=lambda: 0,
            gpu_types=lambda: {"H100": {"total": 2, "free": free}},
            open_gpu_seconds=dict,
        )

    one, two = gateway_registry(readings(0)), gateway_registry(readings(2))
    key = ("gpupool_gpus", (("gpu_type", "H100"), ("use", "free")))
    assert samples(render_metrics(one))[key] == 0
    assert samples(render_metrics(two))[key] == 2


def test_every_database_round_trip_is_counted(tmp_path):
    """Statements, commits and rollbacks each count once; their time adds up."""
    from sqlalchemy import text

    from kernel_gateway.metrics import EVENTS
    from kernel_gateway.store import open_store

    db = open_store(str(tmp_path / "gateway.db"))
    before = samples(render_metrics(EVENTS))
    with db() as s:
        s.execute(text("SELECT 1"))
        s.execute(text("SELECT 2"))
        s.commit()
    with db() as s:
        s.execute(text("SELECT 3"))
        s.rollback()
    after = samples(render_metrics(EVENTS))
    trips = ("gpupool_db_round_trips_total", ())
    assert after[trips] - before[trips] == 5  # three statements, a commit, a rollback
    spent = ("gpupool_db_statement_seconds_total", ())
    assert after[spent] > before[spent]
