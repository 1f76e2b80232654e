"""Giving memory back to the system after websockets close.

glibc's malloc keeps what the process freed for later use instead of returning it, most of all
in the arenas of other threads (ZMQ's I/O thread allocates each socket's queues): even once a
closed websocket's objects are gone (websocket.py), the memory they held stays with the host
(after 400 websockets, 224 MiB of 324 stayed). `malloc_trim(0)` returns the free pages of every
arena; it runs a second after websockets close or kernels end, at most once a second, in a
worker thread. Where malloc is not glibc's (musl, macOS), nothing is done."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

TRIM_DELAY = 1.0  # seconds after the first close of a burst: one trim for much of it


def _malloc_trim() -> Callable[[int], Any] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], Any] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class MemoryTrim:
    def __init__(self, delay: float = TRIM_DELAY) -> None:
        self.delay = delay
        self._trim = _malloc_trim()
        self._pending: asyncio.TimerHandle | None = None

    def soon(self) -> None:
        """Trim in `delay` seconds, unless a trim is already due by then."""
        if self._trim is None or self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        self._pending = loop.call_later(self.delay, self._run, loop)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = None
        if self._trim is not None:
            loop.run_in_executor(None, self._trim, 0)
