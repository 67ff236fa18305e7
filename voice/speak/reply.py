"""SpokenReply: one chat reply spoken sentence by sentence while the model is still writing it.

It listens to the reply's updates (the text so far; `final` once stored), hands each complete
sentence, made speakable, to the synthesis worker, and the worker writes the audio into
`output`. A sentence's audio is held back until it can be played without a gap (voice/speak/pace.py):
playback may start (`ready`) as soon as what is buffered covers the engine's pace, measured now,
over the text known so far; a later sentence that the engine delivers slower than that is played
whole, after a pause, never in fragments. Sentence n+1 is synthesized while sentence n plays; a
reply's sentences go to the worker one at a time, so replies of different guilds take turns and
all keep ahead of playback.
Nothing here raises into the caller: a voice failure ends the audio, never the text reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import deque

from core.metrics import Metrics
from core.replies import ReplyUpdate
from voice.speak.pace import Progress, SentenceTiming, shortfall
from voice.speak.pcm import PcmStream
from voice.speak.registry import VoiceStates
from voice.speak.sentences import SentenceSplitter
from voice.speak.speakable import speakable
from voice.speak.tts import TextToSpeech
from voice.speak.worker import SynthesisWorker

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w")

# A reply that pauses right after a sentence (it is screened a sentence at a time) has that sentence
# spoken once no more text has come for this long.
SETTLE_S = 0.25


class SpokenReply:
    """One reply being spoken: its sentences go to `worker` in `voice` (its state from `states`), its
    audio into `output`; `finish` gives its slot in the worker back."""

    def __init__(self, worker: SynthesisWorker, states: VoiceStates, voice: str | None, output: PcmStream,
                 metrics: Metrics, *, language: str, adapter: str, label: str):
        self.worker = worker
        self.states = states
        self.metrics = metrics
        self.voice = voice
        self.output = output
        self.adapter = adapter
        self.label = label
        self.started = time.monotonic()
        self.ready = asyncio.Event()  # there is audio to play (or nothing will come): start reading
        self.synthesized = asyncio.Event()  # no more audio will be written
        self.sentences = 0
        self.synthesis_s = 0.0
        self.error: Exception | None = None
        self.turn_ended_at: float | None = None  # when the spoken turn it answers ended (listening)
        self.slow = False  # a sentence had to be held whole: the engine ran slower than real time
        self._engine: TextToSpeech = worker.engine
        self._language = language
        self._splitter = SentenceSplitter(self._language)
        self._seen = ""
        self._pending: deque[str] = deque()
        self._upcoming: tuple[int, ...] = ()  # the lengths of `_pending`, for the worker thread to read
        self._in_flight = False
        self._final = False
        self._stop = threading.Event()
        self._finished = False
        self._playing = False  # its audio is being played (set from the worker thread, read there too)
        self._settle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # ---- the text side (event loop) ------------------------------------------------------------

    async def on_update(self, update: ReplyUpdate) -> None:
        """Take the reply so far; complete sentences go to synthesis at once."""
        try:
            self._take(update.text, update.final)
        except Exception as exc:  # noqa: BLE001 - voice must never break the text reply
            log.exception("voice: could not speak reply %s", self.label)
            self.error = exc
            self.cancel()

    def _take(self, text: str, final: bool) -> None:
        if self._stop.is_set() or self._final:
            return
        if not text.startswith(self._seen[: self._splitter.consumed]):
            # A discarded draft (the service regenerates some replies): say the new text from its start.
            self._pending.clear()
            self._splitter = SentenceSplitter(self._language)
        self._seen = text
        if self._settle is not None:
            self._settle.cancel()
        self._queue(self._splitter.feed(text, final))
        self._final = final
        if not final:
            self._settle = self._loop.call_later(SETTLE_S, self._settled)
        self._next()

    def _settled(self) -> None:
        if not (self._stop.is_set() or self._final):
            self._queue(self._splitter.ended(self._seen))
            self._next()

    def _queue(self, sentences: list[str]) -> None:
        for sentence in sentences:
            said = speakable(sentence, read_numbers=not self._engine.reads_numbers, language=self._language)
            if _WORD.search(said):  # punctuation alone says nothing
                self._pending.append(said)
        self._upcoming = tuple(map(len, self._pending))

    def _next(self) -> None:
        if self._in_flight or self.synthesized.is_set():
            return
        if self._pending and not self._stop.is_set():
            self._in_flight = True
            sentence = self._pending.popleft()
            self._upcoming = tuple(map(len, self._pending))
            self.worker.submit(lambda engine: self._synthesize(engine, sentence))
        elif self._final or self._stop.is_set():
            self._end()

    def cancel(self) -> None:
        """Stop now (/skip, or the text reply failed): nothing more is synthesized or played."""
        if self._settle is not None:
            self._settle.cancel()
        self._stop.set()
        self._pending.clear()
        self._upcoming = ()
        self.output.cancel()
        self._next()

    def abandon_unfinished(self) -> None:
        """The text reply ended without a final update (it failed): drop what is not spoken yet."""
        if not self._final:
            self.error = self.error or RuntimeError("the text reply failed before it was complete")
            self.cancel()

    def _end(self) -> None:
        self.output.finish()
        self.synthesized.set()
        self.ready.set()

    # ---- synthesis (worker thread) -------------------------------------------------------------

    def _synthesize(self, engine: TextToSpeech, sentence: str) -> None:
        error = None
        try:
            if not self._stop.is_set():
                state = self.states.get(self.voice, engine)
                started = time.monotonic()
                arrivals: list[float] = []
                durations: list[float] = []
                self.output.hold()  # until this sentence can be played without a gap
                held = True
                for chunk in engine.synthesize(state, sentence, self._stop):
                    self.output.write(chunk)
                    arrivals.append(time.monotonic() - started)
                    durations.append(len(chunk) / engine.sample_rate)
                    if held and self._may_play(
                            Progress(len(sentence), arrivals[-1], arrivals[0], sum(durations), durations[0])):
                        held = False
                        self._play()
                took = time.monotonic() - started
                if held:  # whole now; for a reply playing already, maybe after a pause
                    paused = self._playing and self.output.starved()
                    self.output.release()
                    if paused and durations and took > sum(durations):
                        self._slower_than_real_time(engine, took / sum(durations))
                self.synthesis_s += took
                self.metrics.voice_synthesis.labels(engine.name).observe(took)
                if arrivals and sum(durations):
                    timing = SentenceTiming(len(sentence), tuple(arrivals), tuple(durations))
                    self.worker.observe(timing)
                    self.metrics.voice_rtf.labels(engine.name).observe(took / timing.audio_s)
        except Exception as exc:  # noqa: BLE001 - reported on the loop; the text reply goes on
            error = exc
        try:
            self._loop.call_soon_threadsafe(self._synthesized, error)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def _may_play(self, current: Progress | None) -> bool:
        """Whether what is written can be played from now on and not run dry before the known text is
        spoken (voice/speak/pace.py). An engine not measured yet first finishes a sentence."""
        pace = self.worker.pace
        if pace is None:
            return current is None
        return shortfall(pace, self.output.buffered_seconds(), current, list(self._upcoming)) <= 0

    def _play(self) -> None:
        """Hand out the held sentence, and start playing if not yet (worker thread)."""
        self.output.release()
        if not self._playing:
            self._playing = True
            self._loop.call_soon_threadsafe(self.ready.set)

    def _slower_than_real_time(self, engine: TextToSpeech, rtf: float) -> None:
        """A sentence had to be held whole while the reply played, as the engine ran slower than real
        time: said once a reply (worker thread)."""
        if not self.slow:
            self.slow = True
            log.warning("voice: reply %s: the %s engine runs slower than real time here (real-time factor %.2f): "
                        "its sentences are played whole, with pauses between them", self.label, engine.name, rtf)
            self.metrics.voice_slow_replies.labels(engine.name).inc()

    def _synthesized(self, error: Exception | None) -> None:
        self._in_flight = False
        if error is not None:
            log.warning("voice: synthesis failed for reply %s (voice %s): %s",
                        self.label, self.voice or "default", error)
            self.error = error
            self._stop.set()
            self._pending.clear()
        else:
            self.sentences += 1
            if not self._playing and (not self._pending or self._may_play(None)):
                self._playing = True
                self.ready.set()
        self._next()

    # ---- the end -------------------------------------------------------------------------------

    def finish(self, outcome: str) -> None:
        """The listener is done with this reply (spoken, skipped, failed...): free its slot, log, count."""
        if self._finished:
            return
        self._finished = True
        if not self.synthesized.is_set():
            self.cancel()
        self.metrics.voice_queue_depth.set(self.worker.unreserve())
        if self.error is not None and outcome == "spoken":
            outcome = "failed"
        metrics, output = self.metrics, self.output
        metrics.voice_replies.labels(self.adapter, outcome).inc()
        metrics.voice_audio.labels(self.adapter).inc(output.seconds_written)
        first_audio = None
        if output.first_read_at is not None:
            first_audio = output.first_read_at - self.started
            metrics.voice_first_audio.labels(self.adapter).observe(first_audio)
        after_turn = ""
        if self.turn_ended_at is not None and output.first_read_at is not None:
            metrics.voice_turn_to_first_audio.observe(output.first_read_at - self.turn_ended_at)
            after_turn = f" turn_to_first_audio={output.first_read_at - self.turn_ended_at:.2f}s"
        audio = output.seconds_written
        log.info(
            "voice: reply %s voice=%s outcome=%s sentences=%d audio=%.2fs frames=%d synthesis=%.2fs rtf=%.2f "
            "first_audio=%s longest_gap=%.0fms%s",
            self.label, self.voice or "default", outcome, self.sentences, audio,
            output.bytes_written // output.frame_bytes if output.frame_bytes else 0, self.synthesis_s,
            self.synthesis_s / audio if audio else 0.0,
            f"{first_audio:.2f}s" if first_audio is not None else "none", output.longest_gap_s * 1000, after_turn,
        )
