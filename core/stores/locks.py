"""Per-conversation ordering inside one process: a lock per key, alive only while used."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Hashable

from core.conversation import ConversationBusy

class KeyedLocks:
    """One asyncio lock per conversation, alive only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, list] = {}  # key -> [lock, users]

    @asynccontextmanager
    async def hold(self, key: Hashable, wait_s: float | None = None):
        """Hold `key`'s lock; raises ConversationBusy when it is not free within `wait_s` (None: wait)."""
        entry = self._entries.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            try:
                async with asyncio.timeout(wait_s):  # cancellation-safe, unlike wait_for on 3.11
                    await entry[0].acquire()
            except TimeoutError:
                raise ConversationBusy(f"{key} stayed busy for {wait_s:g} s") from None
            try:
                yield
            finally:
                entry[0].release()
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._entries[key]
