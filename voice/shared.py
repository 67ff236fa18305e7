"""One loaded model per key in a process, shared by every caller and counted: the text-to-speech
worker and the speech-to-text transcriber are both held this way."""

from __future__ import annotations

import threading
from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class Shared(Generic[T]):
    def __init__(self) -> None:
        self._held: dict[Hashable, tuple[T, int]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: Hashable, load: Callable[[], T]) -> T:
        """The item of `key`, loaded by `load()` on first use (blocking, and one load at a time)."""
        with self._lock:
            item, users = self._held.get(key) or (load(), 0)
            self._held[key] = (item, users + 1)
            return item

    def release(self, item: T) -> bool:
        """One user less of `item`; True when it was the last (the caller then stops it)."""
        with self._lock:
            key = next(k for k, (held, _) in self._held.items() if held is item)
            users = self._held[key][1] - 1
            if users:
                self._held[key] = (item, users)
                return False
            del self._held[key]
            return True
