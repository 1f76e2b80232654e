"""What the gateway adds to a shape (gpupool.wire.Shape): prices, the kernel picker's names, and
the kernel model's words."""

from __future__ import annotations

from gpupool.wire import KernelState, Shape

# US dollars per GPU-hour; one place for every price the gateway shows or charges.
USD_PER_GPU_HOUR: dict[str, float] = {
    "H200": 4.50,
    "H100": 3.95,
    "A100": 2.40,
    "L40S": 1.60,
    "A10G": 1.10,
    "L4": 0.80,
    "V100": 1.20,
    "T4": 0.50,
}
DEFAULT_USD_PER_GPU_HOUR = 2.00  # a type missing from the table (a MIG profile, say)


def usd_per_gpu_hour(gpu_type: str) -> float:
    return USD_PER_GPU_HOUR.get(gpu_type, DEFAULT_USD_PER_GPU_HOUR)


# What the Jupyter protocol's execution_state shows for each of our states (DESIGN.md); a
# running kernel shows its host's.
EXECUTION_STATE: dict[str, str] = {
    KernelState.QUEUED: "starting",
    KernelState.STARTING: "starting",
    KernelState.SUSPENDED: "idle",
    KernelState.RESUMING: "busy",
    KernelState.DEAD: "dead",
}


def usd_per_hour(shape: Shape) -> float:
    """What a kernel of `shape` costs an hour: each GPU at its type's price; CPU is free."""
    if not shape.gpu_count or shape.gpu_type is None:
        return 0.0
    return shape.gpu_count * usd_per_gpu_hour(shape.gpu_type)


def display_name(shape: Shape) -> str:
    """The kernel picker's name of a shape, with its price."""
    if not shape.gpu_count:
        return "Python 3 · CPU"
    return f"Python 3 · {shape} · ${usd_per_hour(shape):.2f}/h"
