"""The process's text-to-speech model and the one thread that runs it.

Engines are not thread-safe, and one loaded model serves every guild, browser and command of the
process: `acquire_worker` loads an engine once per (engine, model, device, language) and hands
every caller the same worker; the last `release()` unloads it. Jobs run one at a time, in
submission order, off the event loop. `max_queue` bounds how many replies may be spoken or
waiting at once; a reply that does not fit gets VoiceBusy and stays text only.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from core.config.schema import VoiceSection
from voice.speak.factory import load_tts
from voice.speak.tts import TextToSpeech
from voice.speak.pace import Pace, SentenceTiming
from core.loading import Shared

log = logging.getLogger(__name__)

Job = Callable[[TextToSpeech], None]


class VoiceBusy(RuntimeError):
    """Too many replies are being spoken or waiting; this one stays text only."""


class SynthesisWorker:
    def __init__(self, engine: TextToSpeech, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.replies = 0  # replies holding a slot: being spoken or waiting
        self.pace: Pace | None = None  # how the engine has been delivering sentences (None: not measured yet)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"voice-{engine.name}", daemon=True)
        self._thread.start()

    def reserve(self) -> int:
        """Take a reply slot; the slots taken now. Raises VoiceBusy when all `max_queue` are taken."""
        with self._lock:
            if self.replies >= self.max_queue:
                raise VoiceBusy(f"{self.replies} replies are already being spoken or waiting")
            self.replies += 1
            return self.replies

    def unreserve(self) -> int:
        """Give a reply slot back; the slots taken now."""
        with self._lock:
            self.replies -= 1
            return self.replies

    def observe(self, timing: SentenceTiming) -> None:
        """Record how one sentence came out of the engine (from the worker thread)."""
        self.pace = Pace.first(timing) if self.pace is None else self.pace.observe(timing)

    def submit(self, job: Job) -> None:
        """Run `job(engine)` in the worker thread after the jobs already submitted."""
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job(self.engine)
            except Exception:  # noqa: BLE001 - jobs report their own failures; never lose the thread
                log.exception("voice: a synthesis job failed")

    def release(self) -> None:
        """Done with the worker; the last user's release stops it and unloads the model."""
        if not _WORKERS.release(self):
            return
        self._jobs.put(None)
        self._thread.join(timeout=30)


_WORKERS: Shared[SynthesisWorker] = Shared()


def acquire_worker(section: VoiceSection) -> SynthesisWorker:
    """The worker of the configured engine, loading it on first use (blocking: call it off the loop)."""
    key = (section.engine, section.model, section.device, section.language)
    return _WORKERS.acquire(key, lambda: SynthesisWorker(load_tts(section), section.max_queue))
