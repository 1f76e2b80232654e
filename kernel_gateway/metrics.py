"""Prometheus metrics: kernels by state, GPUs free and used by type, queue length, start latency,
GPU-seconds billed.

What the gateway holds now (kernels, GPUs, the queue, open intervals) is read at each scrape by
`GatewayCollector`; only events are counted as they happen (start latency, seconds billed). This
module imports none of the gateway's modules that count into it (only `shapes`, a leaf).

`gpupool_kernels{state="resuming"}` is 0: a resuming kernel is a queued or starting row with a
checkpoint, counted under its row's state."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpupool.wire import KernelState

# Each shown, from 0; a deleted kernel is no longer the pool's.
KERNEL_STATES = [state.value for state in KernelState if state is not KernelState.DELETED]

EVENTS = CollectorRegistry()  # counted where they happen; every gateway's scrape shows them
START_SECONDS = Histogram(
    "gpupool_kernel_start_seconds",
    "Seconds from a kernel request to a running kernel (queue time included).",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
    registry=EVENTS,
)
# Every round trip to the database: each SQL statement, commit and rollback, and (PostgreSQL)
# each connection check before use; and the seconds spent in statements, lock waits included.
DB_ROUND_TRIPS = Counter(
    "gpupool_db_round_trips",
    "Round trips to the gateway's database: statements, commits, rollbacks, connection checks.",
    registry=EVENTS,
)
DB_SECONDS = Counter(
    "gpupool_db_statement_seconds",
    "Seconds the gateway spent waiting on its database's statements (lock waits included).",
    registry=EVENTS,
)
# Counted when a ledger interval closes (so a restart starts it again from 0, as counters may);
# what open intervals have run up so far is the gauge `gpupool_gpu_seconds_open`.
GPU_SECONDS_BILLED = Counter(
    "gpupool_gpu_seconds_billed",
    "GPU-seconds billed in closed ledger intervals, by GPU type.",
    ["gpu_type"],
    registry=EVENTS,
)


@dataclass(frozen=True)
class Readings:
    """Where a scrape reads the gateway: functions rather than the gateway's objects, so that
    this module needs none of their modules (`app.py` wires them)."""

    kernel_counts: Callable[[], Mapping[str, int]]  # row state -> kernels, deleted ones left out
    queue_length: Callable[[], int]
    gpu_types: Callable[[], Mapping[str, Mapping[str, int]]]  # type -> {"total", "free", ...}
    open_gpu_seconds: Callable[[], Mapping[str, float]]  # type -> seconds of open intervals


class GatewayCollector(Collector):
    def __init__(self, readings: Readings) -> None:
        self.readings = readings

    def collect(self) -> Iterable[Metric]:
        counts = self.readings.kernel_counts()
        kernels = GaugeMetricFamily("gpupool_kernels", "Kernels by state.", labels=["state"])
        for state in KERNEL_STATES:
            kernels.add_metric([state], counts.get(state, 0))
        yield kernels
        types = self.readings.gpu_types()
        gpus = GaugeMetricFamily(
            "gpupool_gpus", "GPUs in the pool by type and use.", labels=["gpu_type", "use"]
        )
        for gpu_type, entry in types.items():
            gpus.add_metric([gpu_type, "free"], entry["free"])
            gpus.add_metric([gpu_type, "used"], entry["total"] - entry["free"])
        yield gpus
        yield GaugeMetricFamily(
            "gpupool_queue_length", "Kernels waiting for a GPU.", value=self.readings.queue_length()
        )
        open_seconds = GaugeMetricFamily(
            "gpupool_gpu_seconds_open",
            "GPU-seconds run up so far by ledger intervals still open, by GPU type.",
            labels=["gpu_type"],
        )
        for gpu_type, seconds in self.readings.open_gpu_seconds().items():
            open_seconds.add_metric([gpu_type], seconds)
        yield open_seconds
        for gpu_type in types:
            GPU_SECONDS_BILLED.labels(gpu_type)  # shown from 0 for every type in the pool
        yield from EVENTS.collect()


def gateway_registry(readings: Readings) -> CollectorRegistry:
    """What one gateway's /metrics shows."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(readings))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
