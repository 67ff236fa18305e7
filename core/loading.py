"""Loading models in a process: one load at a time (`model_loading`), each model loaded once and
shared by every caller (`Shared`: the text-to-speech worker, the speech-to-text transcriber), and
loaded off the event loop on first use (`LoadOnce`).
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


# One model (or adapter) loads at a time in a process: transformers' lazy module is not thread-safe
# on first use ("ImportError: cannot import name 'AutoModelForCausalLM'"), and two from_pretrained
# calls at once in two threads broke each other's meta-device initialisation ("Cannot copy out of
# meta tensor"). Personas, adapters and voice models all load in worker threads.
_LOADING = threading.Lock()


@contextmanager
def model_loading():
    """Hold the process's model-loading turn, on one CPU thread (see `one_cpu_thread`)."""
    with _LOADING, one_cpu_thread():
        yield


@contextmanager
def one_cpu_thread():
    """Run torch work (loading a model, an adapter) on one thread of this thread's own.

    libgomp stops spinning between parallel regions once the process's OpenMP teams hold more
    threads than there are cores: the team a loading thread leaves behind (thread pools keep their
    threads) made every small matrix product of the engine's worker about 3x slower (150 us
    against 45 us for a 576x1536 product on 2 cores). A loading thread that never starts a team
    leaves the worker's team alone.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Shared(Generic[T]):
    """One loaded item per key, shared and counted."""

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


class LoadOnce(Generic[T]):
    """A model loaded off the event loop on first use: callers that come while it loads wait for that
    same load, and a load that failed is tried again by the next caller. `release` gives it back."""

    def __init__(self, load: Callable[[], T], release: Callable[[T], None]):
        self._load = load
        self._release = release
        self._loading: asyncio.Future | None = None
        self.item: T | None = None

    async def get(self) -> T:
        """The item, loading it first if need be; raises what the load raises."""
        if self.item is not None:
            return self.item
        if self._loading is None or (self._loading.done() and self._loading.exception() is not None):
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        item = await asyncio.shield(self._loading)
        if self.item is None:
            self.item = item
        return self.item

    async def close(self) -> None:
        """Stop a load in progress and release what was loaded (off the event loop)."""
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self.item is not None:
            item, self.item = self.item, None
            await asyncio.to_thread(self._release, item)
