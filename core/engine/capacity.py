"""Deadline-aware admission: will a request finish in time at the speed the engine measures?

The engine times every decode step and every prefill; `SpeedModel` fits those times (the most
recent ones of each size), and `plan` replays the queue through the batch's
slots at that speed, each request taking its worst case (all `max_new_tokens`). A request is
refused when it, or a request already admitted that would otherwise be in time, would finish
past its deadline. Pure Python: it runs on the event loop at every submit.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

HEADROOM = 0.7  # plan to finish within this share of the time left before a deadline


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
    Coefficients are non-negative: more rows or tokens never make a pass faster."""

    def __init__(self, size: int, per_group: int = 32):
        self.size = size
        self._samples: dict[int, deque[tuple[list[float], float]]] = {}
        self._per_group = per_group
        self._theta: list[float] | None = None

    @property
    def samples(self) -> int:
        return sum(len(group) for group in self._samples.values())

    def add(self, group: int, x: list[float], y: float) -> None:
        self._samples.setdefault(group, deque(maxlen=self._per_group)).append((x, y))
        self._theta = None

    def predict(self, x: list[float]) -> float:
        if self._theta is None:
            self._theta = self._solve()
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
    """Seconds per decode step (a + b*rows + c*rows*width) and per prefill (d + e*tokens)."""

    def __init__(self) -> None:
        self._step = _Fit(3)
        self._prefill = _Fit(2)
        self._fastest_step = math.inf
        self._fastest_token = math.inf

    @property
    def ready(self) -> bool:
        return self._step.samples >= 2 and self._prefill.samples >= 2

    def record_step(self, rows: int, width: int, seconds: float) -> None:
        self._step.add(rows.bit_length(), [1.0, rows, rows * width / 1024], seconds)
        self._fastest_step = min(self._fastest_step, seconds)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        self._prefill.add(tokens.bit_length(), [1.0, tokens / 1024], seconds)
        self._fastest_token = min(self._fastest_token, seconds / max(tokens, 1))

    def step_seconds(self, rows: int, width: int) -> float:
        # A fit is never trusted below the fastest step ever seen.
        return max(self._step.predict([1.0, rows, rows * width / 1024]), self._fastest_step)

    def prefill_seconds(self, tokens: int) -> float:
        return max(self._prefill.predict([1.0, tokens / 1024]), self._fastest_token * tokens)


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
    be in time. "In time" keeps some of the time left in reserve: speed is an estimate."""

    def late(work: Work) -> bool:
        return work.deadline is not None and work.finish > now + HEADROOM * (work.deadline - now)

    before = [_copy(w) for w in running + waiting]
    plan(before[:len(running)], before[len(running):], slots, speed, now, joinable)
    after = [_copy(w) for w in running + waiting] + [_copy(new)]
    plan(after[:len(running)], after[len(running):], slots, speed, now, joinable)
    if late(after[-1]):
        return False
    return not any(late(a) and not late(b) for b, a in zip(before, after))


def _copy(work: Work) -> Work:
    return Work(work.remaining, work.context, work.prefill, work.deadline)
