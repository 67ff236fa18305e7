"""How many CPU threads each kind of forward pass gets, chosen by timing the candidates.

A batch-1 decode step is a chain of small matrix-vector products: on an idle machine a second
thread speeds it up, but when the other cores are busy each product waits for a thread that is
not scheduled, and one thread is several times faster (measured on 2 cores: 0.47 ms against 8 ms
per product). Large batches and prefills gain from every core. Load changes, so the choice is
measured, per kind of pass, and re-checked now and then.
"""

from __future__ import annotations

EXPLORE_EVERY = 64  # passes of one kind between re-checks of the runner-up
SMOOTHING = 0.3


def bucket(size: int) -> int:
    """Sizes are grouped by powers of two: 1, 2, 4, 8, ..."""
    return 1 << max(0, size - 1).bit_length()


class ThreadTuner:
    """Keeps, per kind of pass, a smoothed time for each candidate thread count."""

    def __init__(self, max_threads: int):
        powers = {1 << i for i in range(max_threads.bit_length()) if 1 << i <= max_threads}
        self.candidates = sorted(powers | {max_threads})
        self._seconds: dict[tuple, dict[int, float]] = {}
        self._passes: dict[tuple, int] = {}

    def choose(self, kind: tuple) -> int:
        """The thread count for the next pass of this kind."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        seconds = self._seconds.setdefault(kind, {})
        untried = [n for n in self.candidates if n not in seconds]
        if untried:
            return untried[0]
        count = self._passes[kind] = self._passes.get(kind, 0) + 1
        ranked = sorted(self.candidates, key=seconds.__getitem__)
        return ranked[1] if count % EXPLORE_EVERY == 0 else ranked[0]

    def record(self, kind: tuple, threads: int, seconds: float) -> None:
        times = self._seconds.setdefault(kind, {})
        times[threads] = seconds if threads not in times else (1 - SMOOTHING) * times[threads] + SMOOTHING * seconds

    def best(self, kind: tuple) -> int | None:
        """The currently preferred count, if this kind has been measured."""
        seconds = self._seconds.get(kind)
        return min(seconds, key=seconds.__getitem__) if seconds else None
