"""GPU shapes as clients name them: kernelspec names, prices and the kernel model's words."""

from __future__ import annotations

from dataclasses import dataclass

from gpupool.wire import KernelState, kernel_name, parse_kernel_name

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


@dataclass(frozen=True)
class Shape:
    gpu_type: str | None  # None for CPU
    gpu_count: int

    @property
    def kernel_name(self) -> str:
        return kernel_name(self.gpu_type, self.gpu_count)

    @property
    def usd_per_hour(self) -> float:
        if not self.gpu_count or self.gpu_type is None:
            return 0.0
        return self.gpu_count * usd_per_gpu_hour(self.gpu_type)

    @property
    def display_name(self) -> str:
        if not self.gpu_count:
            return "Python 3 · CPU"
        return f"Python 3 · {self.gpu_type} ×{self.gpu_count} · ${self.usd_per_hour:.2f}/h"  # noqa: RUF001


CPU = Shape(None, 0)


def shape_of_name(name: str) -> Shape | None:
    """The shape of a kernelspec name; None for a name that is not one of ours."""
    parsed = parse_kernel_name(name)
    return None if parsed is None else Shape(*parsed)
