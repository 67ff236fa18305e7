"""How many CPU threads each kind of forward pass gets, chosen by timing the candidates.

A batch-1 decode step is a chain of small matrix-vector products: on an idle machine a second
thread speeds it up, but when the other cores are busy each product waits for a thread that is
not scheduled, and one thread is several times faster (measured on 2 cores: 0.47 ms against 8 ms
per product). Large batches and prefills gain from every core. Load changes, so the choice is
measured, per kind of pass, and re-checked now and then.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque

EXPLORE_EVERY = 64  # passes of one kind between re-checks of the runner-up, at first
EXPLORE_AT_MOST_EVERY = 4096  # a runner-up that keeps losing is re-checked ever more rarely, down to this
RECENT = 5  # a count's time is the median of its last passes: one pass the scheduler delayed moves nothing

# How a pass's count is chosen: each count in turn (the engine timing itself before it serves), the
# tuner's choice (re-checks included), or the preferred count (a pass whose time admission plans with).
EXPLORE, SERVE, SETTLED = "explore", "serve", "settled"


def bucket(size: int) -> int:
    """Sizes are grouped by powers of two: 1, 2, 4, 8, ..."""
    return 1 << max(0, size - 1).bit_length()


class ThreadTuner:
    """Keeps, per kind of pass, the recent times of each candidate thread count.

    A re-check of a losing count costs a slow pass (on a busy machine a two-thread step can take
    40 times longer), so each time the runner-up loses again its next re-check waits twice as long.
    A re-check that wins (the machine got quieter) is repeated at once, so that the runner-up takes
    over after a few passes instead of a few thousand. On a busy machine a two-thread pass now and
    then takes 10-30 times its usual time (the other thread was not scheduled): times are medians,
    so such a pass alone changes no choice.
    """

    def __init__(self, max_threads: int):
        powers = {1 << i for i in range(max_threads.bit_length()) if 1 << i <= max_threads}
        self.candidates = sorted(powers | {max_threads})
        self._seconds: dict[tuple, dict[int, deque[float]]] = {}
        self._since: dict[tuple, int] = {}  # passes since the last re-check
        self._interval: dict[tuple, int] = {}
        self._inherited: dict[tuple, int] = {}  # kinds that started at a neighbouring size's count

    def choose(self, kind: tuple, explore: bool = False) -> int:
        """The thread count for the next pass of this kind. A kind never run starts at the count
        preferred for the nearest size of its sort that has run, and tries its other counts as
        re-checks, the first at its next pass (the engine lets a re-check run only when the requests
        in flight can afford it: a trial can be many times slower than admission's estimate). With
        `explore` (the engine timing itself before it serves), or when no size of its sort has run,
        each count is tried in turn first."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        seconds = self._seconds.setdefault(kind, {})
        untried = [n for n in self.candidates if n not in seconds]
        if untried and (explore or not self._inherits(kind)):
            return untried[0]
        if not seconds:
            return self._inherited[kind]
        ranked = sorted(seconds, key=lambda n: statistics.median(seconds[n])) + untried
        since = self._since[kind] = self._since.get(kind, 0) + 1
        if since >= self._interval.setdefault(kind, EXPLORE_EVERY):
            self._since[kind] = 0
            return ranked[1]
        return ranked[0]

    def record(self, kind: tuple, threads: int, seconds: float) -> None:
        times = self._seconds.setdefault(kind, {})
        best = self.best(kind)
        times.setdefault(threads, deque(maxlen=RECENT)).append(seconds)
        if best is not None and threads != best and len(times) == len(self.candidates):
            interval = self._interval.get(kind, EXPLORE_EVERY)
            won = seconds < statistics.median(times[best])
            self._interval[kind] = 1 if won else min(max(2 * interval, EXPLORE_EVERY), EXPLORE_AT_MOST_EVERY)

    def is_trial(self, kind: tuple, threads: int) -> bool:
        """Whether a pass of this kind at `threads` tries a count out (one not yet measured, or the
        runner-up's re-check) rather than running at the preferred count: on a busy machine a trial
        can be many times slower than what the engine runs at."""
        return len(self.candidates) > 1 and threads != self.preferred(kind)

    def preferred(self, kind: tuple) -> int | None:
        """The count a pass of this kind runs at when it tries nothing out."""
        best = self.best(kind)
        return self._inherited.get(kind) if best is None else best

    def extra_seconds(self, kind: tuple, threads: int) -> float:
        """How much longer than at the preferred count a pass of this kind took at `threads` lately.
        A count this kind never ran at is judged by the nearest size of its sort that ran at both,
        as a ratio (a neighbour's load that makes two threads slow makes them slow at every size);
        infinite when no size did."""
        seconds = self._seconds.get(kind, {})
        preferred = self.preferred(kind)
        if preferred not in seconds:
            return math.inf
        usual = statistics.median(seconds[preferred])
        if threads in seconds:
            return max(0.0, statistics.median(seconds[threads]) - usual)
        both = [k for k, times in self._seconds.items()
                if k[0] == kind[0] and k != kind and threads in times and preferred in times]
        if not both:
            return math.inf
        nearest = min(both, key=lambda k: (abs(k[1].bit_length() - kind[1].bit_length()), -k[1]))
        times = self._seconds[nearest]
        return max(0.0, usual * (statistics.median(times[threads]) / statistics.median(times[preferred]) - 1))

    def best(self, kind: tuple) -> int | None:
        """The currently preferred count, if this kind has been measured."""
        seconds = self._seconds.get(kind)
        return min(seconds, key=lambda n: statistics.median(seconds[n])) if seconds else None

    def _inherits(self, kind: tuple) -> bool:
        """Whether this kind takes its count from the measured kind of its sort (decode, prefill) whose
        size is nearest (sizes are powers of two)."""
        if kind not in self._inherited:
            measured = [k for k, seconds in self._seconds.items() if seconds and k[0] == kind[0] and k != kind]
            if not measured:
                return False
            nearest = min(measured, key=lambda k: (abs(k[1].bit_length() - kind[1].bit_length()), -k[1]))
            self._inherited[kind] = self.best(nearest)
            self._interval[kind] = 1  # its other counts are tried at its next pass, when that is affordable
        return True


def in_own_thread(fn, *args):
    """Run `fn(*args)` on a thread that ends with it, so that its OpenMP team ends too (for work
    that needs every core, such as a benchmark's baseline, next to an engine's worker)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)))
    thread.start()
    thread.join()
    return result[0]
