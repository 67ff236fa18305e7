"""Per-user rate limiting shared by every adapter."""

from __future__ import annotations

import time
from collections import deque
from typing import Hashable


class RateLimiter:
    """At most `per_minute` events per key in any 60 seconds; 0 means no limit."""

    def __init__(self, per_minute: int, window_s: float = 60.0):
        self.per_minute = per_minute
        self.window_s = window_s
        self._events: dict[Hashable, deque[float]] = {}

    def check(self, key: Hashable) -> float:
        """Count an event for `key` and return 0, or return the seconds until it would be allowed."""
        if self.per_minute <= 0:
            return 0.0
        now = time.monotonic()
        if len(self._events) > 10_000:
            self._events = {k: v for k, v in self._events.items() if v and now - v[-1] < self.window_s}
        events = self._events.setdefault(key, deque())
        while events and now - events[0] >= self.window_s:
            events.popleft()
        if len(events) >= self.per_minute:
            return self.window_s - (now - events[0])
        events.append(now)
        return 0.0
