"""Deadline-aware admission: will a request finish in time at the speed the engine measures?

The engine times its passes at every batch size before it serves, then every decode step and
every prefill; `SpeedModel` fits those times (the most recent ones of each size) and follows how
fast the machine runs now, and `plan` replays the queue through the batch's
slots at that speed, each request taking its worst case (all `max_new_tokens`). A request is
refused when it, or a request already admitted that would otherwise be in time, would finish
past its deadline. Pure Python: it runs on the event loop at every submit.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass

HEADROOM = 0.7  # plan to finish within this share of the time left before a deadline
PACE_PASSES = 16  # recent passes whose speed sets the pace


@dataclass
class Work:
    """One request as the planner sees it."""

    remaining: int  # tokens still to generate, at most
    context: int  # tokens in its cache once prefilled
    prefill: int  # prompt tokens still to prefill (0 once it decodes)
    deadline: float | None  # monotonic seconds
    start: float = 0.0  # filled in by `plan`
    finish: float = 0.0


class _Fit:
    """Least squares over recent samples, kept per group (a batch size, a prompt size), so that
    what was measured at a size stays known however long the load stays at another size.
    Coefficients are non-negative: more rows or tokens never make a pass faster. At a measured
    size the fit is corrected by how far that group's own samples lie from it (a line through
    every size misses some of them)."""

    def __init__(self, size: int, per_group: int = 32):
        self.size = size
        self._samples: dict[int, deque[tuple[list[float], float]]] = {}
        self._sizes: set[int] = set()  # the sizes (rows or tokens) measured
        self._per_group = per_group
        self._theta: list[float] | None = None
        self._corrections: dict[int, float] = {}

    @property
    def samples(self) -> int:
        return sum(len(group) for group in self._samples.values())

    def measured(self, size: int) -> bool:
        """Whether a pass of this size's group has been measured."""
        return size.bit_length() in self._samples

    def nearest_measured(self, size: int) -> tuple[int | None, int | None]:
        """The largest measured size below `size` and the smallest above it (None where there is none)."""
        below = [s for s in self._sizes if s < size]
        above = [s for s in self._sizes if s > size]
        return max(below, default=None), min(above, default=None)

    def add(self, size: int, x: list[float], y: float) -> None:
        self._samples.setdefault(size.bit_length(), deque(maxlen=self._per_group)).append((x, y))
        self._sizes.add(size)
        self._theta = None

    def predict(self, size: int, x: list[float]) -> float:
        if self._theta is None:
            self._theta, self._corrections = self._solve(), {}
        line = self._line(x)
        group = self._samples.get(size.bit_length())
        if group is None:
            return line
        if size.bit_length() not in self._corrections:
            self._corrections[size.bit_length()] = statistics.median(y / max(self._line(gx), 1e-12) for gx, y in group)
        return line * self._corrections[size.bit_length()]

    def _line(self, x: list[float]) -> float:
        return sum(t * v for t, v in zip(self._theta, x))

    def _solve(self) -> list[float]:
        samples = [s for group in self._samples.values() for s in group]
        active = list(range(self.size))
        while True:
            theta = _least_squares([[x[i] for i in active] for x, _ in samples], [y for _, y in samples])
            full = [0.0] * self.size
            for i, value in zip(active, theta):
                full[i] = value
            negative = [i for i in active[1:] if full[i] < 0]  # the intercept may be anything
            if not negative:
                return full
            active = [i for i in active if i not in negative]


def _least_squares(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Solve the normal equations (with a whisker of ridge, so repeated sizes stay solvable)."""
    n = len(xs[0])
    a = [[sum(x[i] * x[j] for x in xs) for j in range(n)] for i in range(n)]
    b = [sum(x[i] * y for x, y in zip(xs, ys)) for i in range(n)]
    for i in range(n):
        a[i][i] += 1e-9 * (a[i][i] + 1.0)
    for col in range(n):  # Gaussian elimination with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [v - f * w for v, w in zip(a[r], a[col])]
            b[r] -= f * b[col]
    theta = [0.0] * n
    for r in reversed(range(n)):
        theta[r] = (b[r] - sum(a[r][c] * theta[c] for c in range(r + 1, n))) / a[r][r]
    return theta


class SpeedModel:
    """Seconds per decode step (a + b*rows + c*rows*width) and per prefill (d + e*tokens), as this
    machine runs them now.

    The fits give the shape (how the cost grows with rows, width and tokens) from the recent passes
    of each size. `pace` is how much slower than that shape the recent passes ran (a neighbour's
    load halves the speed: the pace doubles) and scales every estimate, of the sizes run lately and
    of the others; samples are kept at pace 1, so a slowdown moves the pace, not the shape. A size
    never measured is assumed slow: no faster than the next larger size measured, else no faster per
    row (per token) than the largest size measured below it, else infinitely slow.
    """

    def __init__(self) -> None:
        self._step = _Fit(3)
        self._prefill = _Fit(2)
        self._fastest_step = math.inf
        self._fastest_token = math.inf
        self._ratios: deque[float] = deque(maxlen=PACE_PASSES)
        # The worker records passes while the event loop (admission) and /metrics read the estimates.
        self._lock = threading.RLock()

    @property
    def pace(self) -> float:
        """The recent passes' times over the shape's estimates: the median of the last few, or of the
        last several where that is higher (a slowdown shows within a few passes, a recovery in more).
        Never below 1: passes faster than the shape teach the shape itself at their sizes, and must
        not make the sizes not run lately look faster than measured."""
        with self._lock:
            recent = list(self._ratios)
        if not recent:
            return 1.0
        return max(1.0, statistics.median(recent), statistics.median(recent[-PACE_PASSES // 4:]))

    def record_step(self, rows: int, width: int, seconds: float) -> None:
        with self._lock:
            self._record(self._step, rows, _step_x(rows, width), seconds, self._fastest_step)
            self._fastest_step = min(self._fastest_step, seconds)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._record(self._prefill, tokens, _prefill_x(tokens), seconds, self._fastest_token * tokens)
            self._fastest_token = min(self._fastest_token, seconds / max(tokens, 1))

    def _record(self, fit: _Fit, size: int, x: list[float], seconds: float, fastest: float) -> None:
        if fit.measured(size):  # the shape is known at this size: how fast it ran says how busy we are
            # Against the estimate admission makes: never below the fastest pass seen (a fit's line can
            # pass near zero at a size, and one such ratio would multiply every estimate).
            self._ratios.append(seconds / max(fit.predict(size, x), fastest, 1e-12))
        fit.add(size, x, seconds / self.pace)

    def step_seconds(self, rows: int, width: int) -> float:
        with self._lock:
            shape = self._shape(self._step, rows, lambda r: _step_x(r, width))
            # A fit is never trusted below the fastest step ever seen.
            return max(shape * self.pace, self._fastest_step)

    def prefill_seconds(self, tokens: int) -> float:
        with self._lock:
            shape = self._shape(self._prefill, tokens, _prefill_x)
            return max(shape * self.pace, self._fastest_token * tokens)

    @staticmethod
    def _shape(fit: _Fit, size: int, x) -> float:
        if fit.measured(size):
            return fit.predict(size, x(size))
        below, above = fit.nearest_measured(size)
        if above is not None:
            return fit.predict(above, x(above))
        if below is not None:
            return fit.predict(below, x(below)) * size / below
        return math.inf


def _step_x(rows: int, width: int) -> list[float]:
    return [1.0, rows, rows * width / 1024]


def _prefill_x(tokens: int) -> list[float]:
    return [1.0, tokens / 1024]


def plan(running: list[Work], waiting: list[Work], slots: int, speed: SpeedModel, now: float,
         joinable: bool = True) -> None:
    """Fill in each request's estimated start and finish: the running batch decodes, and waiting
    requests are prefilled (in order) as slots free up, or, when the cache layout cannot join a
    running batch, once it has drained."""
    active = list(running)
    for work in active:
        work.start = now
    queue = list(waiting)
    t = now
    while active or queue:
        if queue and (joinable or not active):
            admitted = []
            while queue and len(active) + len(admitted) < slots:
                admitted.append(queue.pop(0))
            if admitted:
                for work in admitted:
                    work.start = t
                t += speed.prefill_seconds(sum(w.prefill for w in admitted))
                for work in admitted:
                    work.remaining -= 1  # the prefill yields the first token
                    if work.remaining <= 0:
                        work.finish = t
                    else:
                        active.append(work)
        if not active:
            continue
        steps = min(w.remaining for w in active)
        width = max(w.context for w in active) + steps // 2
        t += steps * speed.step_seconds(len(active), width)
        still = []
        for work in active:
            work.remaining -= steps
            work.context += steps
            if work.remaining <= 0:
                work.finish = t
            else:
                still.append(work)
        active = still


def admits(running: list[Work], waiting: list[Work], new: Work, slots: int, speed: SpeedModel, now: float,
           joinable: bool = True) -> bool:
    """Whether `new` finishes in time without making an admitted request late that would otherwise
    be in time. "In time" keeps some of the time left in reserve (speed is an estimate), except for a
    request alone: it is refused only if even the estimate says it cannot finish, since waiting for
    its deadline would tell its caller no more, later."""
    share = HEADROOM if running or waiting else 1.0

    def late(work: Work) -> bool:
        return work.deadline is not None and work.finish > now + share * (work.deadline - now)

    before = [_copy(w) for w in running + waiting]
    plan(before[:len(running)], before[len(running):], slots, speed, now, joinable)
    after = [_copy(w) for w in running + waiting] + [_copy(new)]
    plan(after[:len(running)], after[len(running):], slots, speed, now, joinable)
    if late(after[-1]):
        return False
    return not any(late(a) and not late(b) for b, a in zip(before, after))


def _copy(work: Work) -> Work:
    return Work(work.remaining, work.context, work.prefill, work.deadline)
