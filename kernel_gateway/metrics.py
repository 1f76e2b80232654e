"""Prometheus metrics: kernels by state, GPUs free and used by type, queue length, start latency."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

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


def render_metrics(state: GatewayState) -> bytes:
    counts = state.kernels.counts()
    for name in ("queued", "starting", "running", "suspended", "resuming", "dead"):
        KERNELS.labels(name).set(counts.get(name, 0))
    for gpu_type, entry in state.pool.types().items():
        GPUS.labels(gpu_type, "free").set(entry["free"])
        GPUS.labels(gpu_type, "used").set(entry["total"] - entry["free"])
    QUEUE.set(len(state.kernels.queue))
    return generate_latest(REGISTRY)
