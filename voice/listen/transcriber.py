"""The process's speech-to-text model and the one thread that runs it.

Turns are queued as they end; each time the thread is free it takes every turn waiting (several
people who stopped speaking together, across guilds) and transcribes them in one batch; turns that
end at the same moment are submitted together, so they always share one. Results come
back through each turn's callback, in the order the turns were submitted, from the worker thread.
`acquire_transcriber` loads a model once per (engine, model, device, language) and hands every
caller the same transcriber; the last `release()` unloads it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from core.config.schema import ListenSection
from voice.listen.hallucinations import real_words
from voice.listen.factory import load_stt
from voice.listen.stt import SpeechToText
from voice.listen.turns import Turn
from core.loading import Shared

log = logging.getLogger(__name__)

MAX_BATCH = 16


@dataclass(frozen=True)
class Transcript:
    """What a turn said: `text` is None when it said nothing (empty, or a Whisper hallucination)."""

    turn: Turn
    text: str | None
    heard_as: str  # Whisper's own words, before filtering
    transcribed_at: float  # time.monotonic()
    transcription_s: float  # the batch's time
    batch: int  # turns in that batch


Done = Callable[[Transcript | None, Exception | None], None]


class Transcriber:
    def __init__(self, stt: SpeechToText):
        self.stt = stt
        self._jobs: queue.SimpleQueue[list[tuple[Turn, Done]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"listen-{stt.name}", daemon=True)
        self._thread.start()

    def submit(self, turns: list[tuple[Turn, Done]]) -> None:
        """Transcribe these turns (in one batch); for each, `done(transcript, None)` or `done(None, error)`
        is called from the worker."""
        self._jobs.put(list(turns))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch = job
            while len(batch) < MAX_BATCH:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)  # stop once this batch is done
                    break
                batch += more
            for start in range(0, len(batch), MAX_BATCH):
                self._transcribe(batch[start:start + MAX_BATCH])

    def _transcribe(self, batch: list[tuple[Turn, Done]]) -> None:
        started = time.monotonic()
        try:
            texts = self.stt.transcribe([turn.audio[: int(self.stt.max_seconds * 16_000)] for turn, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each caller hears why; the thread goes on
            log.exception("listen: transcribing %d turn(s) failed", len(batch))
            for _, done in batch:
                _call(done, None, exc)
            return
        now = time.monotonic()
        for (turn, done), text in zip(batch, texts):
            _call(done, Transcript(turn, real_words(text), text, now, now - started, len(batch)), None)

    def release(self) -> None:
        """Done with the transcriber; the last user's release stops it and unloads the model."""
        if not _TRANSCRIBERS.release(self):
            return
        self._jobs.put(None)
        self._thread.join(timeout=30)


def _call(done: Done, transcript: Transcript | None, error: Exception | None) -> None:
    try:
        done(transcript, error)
    except Exception:  # noqa: BLE001
        log.exception("listen: a transcript's callback failed")


_TRANSCRIBERS: Shared[Transcriber] = Shared()


def acquire_transcriber(section: ListenSection) -> Transcriber:
    """The transcriber of the configured model, loading it on first use (blocking: call it off the loop)."""
    key = (section.engine, section.model, section.device, section.language)
    return _TRANSCRIBERS.acquire(key, lambda: Transcriber(load_stt(section)))
