"""The event loop of gpupool's long-running processes (gateway, host agent, kernel bridge):
uvloop where it is installed, asyncio's own loop otherwise or when GPUPOOL_LOOP=asyncio.

Every kernel message crosses two or three of these processes, each a Python relay whose time per
message is mostly the loop's own work (readiness, callbacks, transports); uvloop does that work
in C. Numbers: docs/benchmarks.md, "uvloop"."""

from __future__ import annotations

import asyncio
import os

LOOP_ENV = "GPUPOOL_LOOP"


def use_uvloop() -> bool:
    """Make the loops this process creates from now on uvloop's; False where it cannot."""
    if os.environ.get(LOOP_ENV, "") == "asyncio":
        return False
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
