"""The CPU thread count of each training step and validation batch, chosen by timing the candidates.

On a 2-core machine that something else also uses, a two-thread step waits for a core that is not
scheduled: measured on SmolLM2-135M, a LoRA step of 8 sessions took 6-8 s with two threads on an idle
machine, 50-59 s with two threads next to another process, and 9-14 s with one. The serving engine
chooses its threads the same way (core/engine/threads.py); here a pass's time is per token, since
batches differ in length.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from core.engine.threads import ThreadTuner


class CpuThreads:
    """`timed(kind, tokens)` runs a pass at the thread count that has been fastest for its kind."""

    def __init__(self, device: torch.device | str):
        cores = torch.get_num_threads()
        self._tuner = ThreadTuner(cores) if torch.device(device).type == "cpu" and cores > 1 else None
        self._initial = cores

    @contextmanager
    def timed(self, kind: str, tokens: int) -> Iterator[None]:
        """The pass runs at its kind's count; the process's count is back as it was afterwards."""
        if self._tuner is None:
            yield
            return
        threads = self._tuner.choose((kind,))
        torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            yield
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(self._initial)
        self._tuner.record((kind,), threads, seconds / max(1, tokens))
