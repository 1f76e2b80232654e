"""Prometheus metrics: kernels by state, GPUs free and used by type, queue length, start latency,
GPU-seconds billed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gpupool.wire import KernelState

if TYPE_CHECKING:
    from .state import GatewayState

REGISTRY = CollectorRegistry()
KERNELS = Gauge("gpupool_kernels", "Kernels by state.", ["state"], registry=REGISTRY)
GPUS = Gauge(
    "gpupool_gpus", "GPUs in the pool by type and use.", ["gpu_type", "use"], registry=REGISTRY
)
QUEUE = Gauge("gpupool_queue_length", "Kernels waiting for a GPU.", registry=REGISTRY)
START_SECONDS = Histogram(
    "gpupool_kernel_start_seconds",
    "Seconds from a kernel request to a running kernel (queue time included).",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
# Counted when a ledger interval closes (so a restart starts it again from 0, as counters may);
# what open intervals have run up so far is the gauge beside it.
GPU_SECONDS_BILLED = Counter(
    "gpupool_gpu_seconds_billed",
    "GPU-seconds billed in closed ledger intervals, by GPU type.",
    ["gpu_type"],
    registry=REGISTRY,
)
GPU_SECONDS_OPEN = Gauge(
    "gpupool_gpu_seconds_open",
    "GPU-seconds run up so far by ledger intervals still open, by GPU type.",
    ["gpu_type"],
    registry=REGISTRY,
)


def render_metrics(state: GatewayState) -> bytes:
    counts = state.kernels.counts()
    for name in KernelState:
        if name is not KernelState.DELETED:  # gone: not a kernel of the pool any more
            KERNELS.labels(name.value).set(counts.get(name, 0))
    for gpu_type, entry in state.pool.types().items():
        GPUS.labels(gpu_type, "free").set(entry["free"])
        GPUS.labels(gpu_type, "used").set(entry["total"] - entry["free"])
    QUEUE.set(len(state.kernels.queue))
    for gpu_type in state.pool.types():
        GPU_SECONDS_BILLED.labels(gpu_type)  # shown from 0 for every type in the pool
    GPU_SECONDS_OPEN.clear()
    for gpu_type, seconds in state.kernels.ledger.open_gpu_seconds().items():
        GPU_SECONDS_OPEN.labels(gpu_type).set(seconds)
    return generate_latest(REGISTRY)
