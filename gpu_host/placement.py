"""Where one kernel runs: its GPUs, its tenant and the Unix account and folders it runs in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TenantSpace:
    """A tenant's share of this machine: the Unix account its kernels run as and its folders."""

    tenant: str
    uid: int
    gid: int
    workdir: Path  # the kernel's working directory and HOME
    rundir: Path  # the kernel's connection file and IPC sockets; only the tenant can enter it


@dataclass
class KernelPlacement:
    kernel_id: str
    gpus: list[str]
    gpu_type: str | None
    space: TenantSpace
    claimed: bool  # False while the kernel waits in the warm pool
    shared: bool = False
    start: str = "cold"  # "warm" when taken from the warm pool
    started_at: float = field(default_factory=time.time)
    owner: str = ""  # the gateway's id for this kernel, so it can tell its own after a crash
    released_at: float | None = None  # when its GPUs were free again (stopped, or seen dead)

    @property
    def connection_file(self) -> Path:
        return self.space.rundir / f"kernel-{self.kernel_id}.json"

    @property
    def ipc_prefix(self) -> Path:
        # Unix socket paths are limited to 107 bytes, so keep this short.
        return self.space.rundir / f"k-{self.kernel_id[:8]}"
