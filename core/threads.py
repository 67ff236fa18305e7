"""How many CPU threads each kind of forward pass gets, chosen by timing the candidates.

A batch-1 decode step is a chain of small matrix-vector products: on an idle machine a second
thread speeds it up, but when the other cores are busy each product waits for a thread that is
not scheduled, and one thread is several times faster (measured on 2 cores: 0.47 ms against 8 ms
per product). Large batches and prefills gain from every core. Load changes, so the choice is
measured, per kind of pass, and re-checked now and then.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

EXPLORE_EVERY = 64  # passes of one kind between re-checks of the runner-up, at first
EXPLORE_AT_MOST_EVERY = 4096  # a runner-up that keeps losing is re-checked ever more rarely, down to this
SMOOTHING = 0.3


def bucket(size: int) -> int:
    """Sizes are grouped by powers of two: 1, 2, 4, 8, ..."""
    return 1 << max(0, size - 1).bit_length()


class ThreadTuner:
    """Keeps, per kind of pass, a smoothed time for each candidate thread count.

    A re-check of a losing count costs a slow pass (on a busy machine a two-thread step can take
    40 times longer), so each time the runner-up loses again its next re-check waits twice as long.
    """

    def __init__(self, max_threads: int):
        powers = {1 << i for i in range(max_threads.bit_length()) if 1 << i <= max_threads}
        self.candidates = sorted(powers | {max_threads})
        self._seconds: dict[tuple, dict[int, float]] = {}
        self._since: dict[tuple, int] = {}  # passes since the last re-check
        self._interval: dict[tuple, int] = {}

    def choose(self, kind: tuple) -> int:
        """The thread count for the next pass of this kind."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        seconds = self._seconds.setdefault(kind, {})
        untried = [n for n in self.candidates if n not in seconds]
        if untried:
            return untried[0]
        ranked = sorted(self.candidates, key=seconds.__getitem__)
        since = self._since[kind] = self._since.get(kind, 0) + 1
        if since >= self._interval.setdefault(kind, EXPLORE_EVERY):
            self._since[kind] = 0
            return ranked[1]
        return ranked[0]

    def record(self, kind: tuple, threads: int, seconds: float) -> None:
        times = self._seconds.setdefault(kind, {})
        best = min(times, key=times.__getitem__) if times else None
        times[threads] = seconds if threads not in times else (1 - SMOOTHING) * times[threads] + SMOOTHING * seconds
        if best is not None and threads != best and len(times) == len(self.candidates):
            still_losing = times[threads] > times[best]
            interval = self._interval.get(kind, EXPLORE_EVERY)
            self._interval[kind] = min(2 * interval, EXPLORE_AT_MOST_EVERY) if still_losing else EXPLORE_EVERY

    def best(self, kind: tuple) -> int | None:
        """The currently preferred count, if this kind has been measured."""
        seconds = self._seconds.get(kind)
        return min(seconds, key=seconds.__getitem__) if seconds else None


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


def in_own_thread(fn, *args):
    """Run `fn(*args)` on a thread that ends with it, so that its OpenMP team ends too (for work
    that needs every core, such as a benchmark's baseline, next to an engine's worker)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)))
    thread.start()
    thread.join()
    return result[0]
