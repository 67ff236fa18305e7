"""How fast a platform lets the bot edit messages, shared by every reply streaming at once."""

from __future__ import annotations

import asyncio
from typing import Hashable

class EditBudget:
    """Message edits allowed per rate bucket (Slack: a workspace; Discord: a channel).

    At most `limit` edits in any `window_s` seconds per bucket, spread out evenly after a small
    burst (a generic cell-rate algorithm), so that replies streaming at once slow down together
    instead of running into the platform's limit. Waiters are served in the order they asked.
    """

    def __init__(self, limit: int, window_s: float):
        if limit < 2:
            raise ValueError("an edit budget needs a limit of at least 2")
        self.limit, self.window_s = limit, window_s
        self._burst = limit // 10
        # (burst + 1) at once, then one per interval: never more than `limit` in any window.
        self._interval = window_s / (limit - self._burst - 1)
        self._next: dict[Hashable, float] = {}  # bucket -> when its schedule is next free

    async def take(self, bucket: Hashable) -> None:
        """Wait until one more edit in `bucket` fits, and count it."""
        now = asyncio.get_running_loop().time()
        if len(self._next) > 10_000:
            self._next = {key: at for key, at in self._next.items() if at > now}
        scheduled = max(self._next.get(bucket, now), now)
        self._next[bucket] = scheduled + self._interval
        wait = scheduled - self._burst * self._interval - now
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:  # not needed after all: give the slot back if none came after
                if self._next.get(bucket) == scheduled + self._interval:
                    self._next[bucket] = scheduled
                raise
