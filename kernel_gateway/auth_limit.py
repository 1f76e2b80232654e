"""Wrong tokens per client address: past the limit, further wrong tokens from it get 429.

Tokens carry 256 random bits, so this is not what keeps them secret; it tells a client with a
wrong token (a forgotten script, a scanner) to slow down, in words, and keeps it out of the
401 logs. A right token is always served, so one such client cannot lock out others behind the
same address. Host registration and heartbeats are not counted."""

from __future__ import annotations

import time
from collections import OrderedDict, deque

WINDOW_SECONDS = 60.0
MAX_ADDRESSES = 10_000  # the oldest addresses are forgotten past this many


class FailedAuth:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute  # 0: no limit
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.get(address)
        if times is None:
            return deque()
        while times and times[0] <= now - WINDOW_SECONDS:
            times.popleft()
        if not times:
            del self._failures[address]
        return times

    def wait_for(self, address: str) -> float:
        """Seconds before `address` may try a token again; 0 when it may now."""
        if not self.per_minute:
            return 0.0
        now = time.monotonic()
        times = self._recent(address, now)
        if len(times) < self.per_minute:
            return 0.0
        return max(0.1, times[-self.per_minute] + WINDOW_SECONDS - now)

    def failed(self, address: str) -> None:
        if not self.per_minute:
            return
        now = time.monotonic()
        times = self._recent(address, now)
        times.append(now)
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > MAX_ADDRESSES:
            self._failures.popitem(last=False)
        while len(times) > self.per_minute:  # only the last `per_minute` decide the wait
            times.popleft()
