"""Turn taking: each person's audio, cut into turns by voice activity and, when there is one, a
turn model that hears whether the sentence is complete.

A turn starts with speech (plus a little audio from before it, so that its first syllable is not
clipped). With a turn model (smart_turn.py), once a pause reaches ASK_MS the model is asked, once
per pause, whether the turn is complete: if so it ends there; if not, it goes on until the person
speaks again (the next pause is judged anew) or the silence reaches `silence_ms`, the cap that
always ends a turn (and the only rule without a turn model). Speech shorter than `min_speech_ms` in
all is not a turn (a cough, a click), and a turn is cut at `max_turn_s`. Silence is also time
without audio: a Discord client stops sending when its user stops speaking, so `tick()` judges and
ends turns whose audio has stopped coming. Only a client that said it stopped (`stopped_sending`)
has its missing audio judged as a pause: audio that is merely late (jitter, a busy machine) must not
end a sentence in the middle; it only counts towards the `silence_ms` cap. Everything happens in
memory; nothing is written anywhere.

`TurnTaker` is fed from a receiving thread and ticked from another (the turn model runs in the
ticking one, outside the lock): it locks around each speaker's state. Its callbacks run in the
thread that called it and must only hand work on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np
import soxr

from core.config.schema import ListenSection
from voice.listen.smart_turn import SmartTurn
from voice.listen.vad import CHUNK, CHUNK_MS, RATE, SpeechDetector

log = logging.getLogger(__name__)

SOURCE_RATE = 48_000  # what arrives: 48 kHz stereo s16le (Discord's Opus, decoded)
SPEECH_ON = 0.5  # Silero's probability that starts speech...
SPEECH_OFF = 0.35  # ...and the lower one that keeps it going (hysteresis)
PREROLL_MS = 256  # audio kept from before the speech began
TAIL_MS = 256  # trailing silence kept at a turn's end (Whisper likes a little context)
# The pause after which the turn model is asked (pipecat asks at its VAD's 200 ms stop). Smart Turn
# leans towards "complete" as silence grows (a comma's pause heard as the end after ~300 ms), so it
# is asked once per pause, on exactly this much silence.
ASK_MS = 200


@dataclass
class Turn:
    """One person's turn: 16 kHz mono float32 audio, in memory only."""

    speaker: Hashable
    audio: np.ndarray
    speech_s: float
    last_speech_at: float  # time.monotonic() of its last speech
    ended_at: float  # when it was judged complete, the silence after it was long enough, or it was cut
    ended_by: str = "silence"  # "smart-turn" (judged complete), "silence" (silence_ms) or "cut" (max_turn_s)
    over_bot: bool = False  # the bot was talking when it began or ended

    @property
    def seconds(self) -> float:
        return len(self.audio) / RATE


@dataclass
class _Speaker:
    detector: SpeechDetector
    resampler: object = field(default_factory=lambda: soxr.ResampleStream(SOURCE_RATE, RATE, 1, dtype="float32"))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # < one chunk, not judged yet
    preroll: deque = field(default_factory=lambda: deque(maxlen=PREROLL_MS // CHUNK_MS))
    chunks: list = field(default_factory=list)  # the turn so far
    speaking: bool = False  # in a turn
    speech_ms: int = 0
    silence_ms: int = 0  # trailing silence in the turn's audio
    announced: bool = False  # on_speech was called for this turn
    asked: bool = False  # the turn model was asked about this pause
    stopped: bool = False  # the client said it stopped sending: missing audio is a pause
    over_bot: bool = False
    turns: int = 0  # turns begun: tells a judged turn from a later one
    last_audio_at: float = 0.0
    last_speech_at: float = 0.0


class TurnTaker:
    """Turns of everyone heard in one place (a Discord voice channel).

    `on_speech(speaker)` is called once a turn holds `barge_in_min_ms` (and `min_speech_ms`) of speech:
    someone is taking the turn; `on_turns(turns)` with the turns that end together (one frame, one
    tick), in the order they end. `turn_model` (None: silence alone) judges pauses; `talking()` says
    whether the bot is talking, which each turn records (`over_bot`).
    """

    def __init__(self, config: ListenSection, *, on_turns: Callable[[list[Turn]], None],
                 on_speech: Callable[[Hashable], None] = lambda speaker: None, turn_model: SmartTurn | None = None,
                 talking: Callable[[], bool] = lambda: False):
        self.config = config
        self.on_turns = on_turns
        self.on_speech = on_speech
        self.turn_model = turn_model
        self.talking = talking
        self.taking_ms = max(config.min_speech_ms, config.barge_in_min_ms)  # speech that takes the turn
        self._speakers: dict[Hashable, _Speaker] = {}
        self._lock = threading.Lock()

    def hear(self, speaker: Hashable, pcm: bytes, now: float | None = None) -> None:
        """Take 48 kHz stereo s16le audio of `speaker` (a 20 ms frame as it arrives)."""
        now = time.monotonic() if now is None else now
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32).reshape(-1, 2).mean(axis=1) / 32768.0
        turns = []
        with self._lock:
            state = self._speakers.get(speaker)
            if state is None:
                state = self._speakers[speaker] = _Speaker(SpeechDetector())
            elif now - state.last_audio_at > self.config.silence_ms / 1000 and not state.speaking:
                state.detector.reset()  # a new stretch of audio after a pause
            state.last_audio_at = now
            state.stopped = False
            audio = np.concatenate([state.pending, state.resampler.resample_chunk(samples)])
            whole = len(audio) // CHUNK * CHUNK
            state.pending = audio[whole:]
            for start in range(0, whole, CHUNK):
                turn = self._judge(speaker, state, audio[start:start + CHUNK], now)
                if turn is not None:
                    turns.append(turn)
        if turns:
            self.on_turns(turns)

    def tick(self, now: float | None = None) -> None:
        """Judge the pauses of people who stopped speaking (the turn model, outside the lock), and end the
        turns judged complete and those whose silence, heard or without audio, reached `silence_ms`."""
        clock = time.monotonic if now is None else (lambda: now)
        now = clock()
        turns, pauses = [], []
        with self._lock:
            for speaker, state in self._speakers.items():
                if not state.speaking:
                    continue
                absent_s = max(0.0, now - state.last_audio_at)
                quiet_ms = state.silence_ms + absent_s * 1000
                if quiet_ms >= self.config.silence_ms:
                    turn = self._end(speaker, state, now, "silence")
                    if turn is not None:
                        turns.append(turn)
                    continue
                absent_s = absent_s if state.stopped else 0.0
                pause_ms = state.silence_ms + absent_s * 1000
                if self.turn_model is not None and not state.asked and pause_ms >= ASK_MS:
                    state.asked = True
                    heard = np.concatenate([*state.chunks, np.zeros(int(absent_s * RATE), dtype=np.float32)])
                    late = int((pause_ms - ASK_MS) * RATE / 1000)  # a late tick: judged on ASK_MS of silence all the same
                    pauses.append((speaker, state, state.turns, heard[:len(heard) - late] if late > 0 else heard))
        for speaker, state, number, heard in pauses:
            if not self.turn_model.complete(heard):
                continue
            with self._lock:
                # Still the same turn, and nobody spoke again while the model listened.
                if self._speakers.get(speaker) is state and state.speaking and state.turns == number and state.asked:
                    turn = self._end(speaker, state, clock(), "smart-turn")
                    if turn is not None:
                        turns.append(turn)
        if turns:
            self.on_turns(turns)

    def stopped_sending(self, speaker: Hashable) -> None:
        """`speaker`'s client said it stopped sending: the time without audio from now on is a pause."""
        with self._lock:
            state = self._speakers.get(speaker)
            if state is not None:
                state.stopped = True

    def forget(self, speaker: Hashable) -> None:
        """Drop everything of `speaker` (they left, or asked not to be heard): no turn comes of it."""
        with self._lock:
            self._speakers.pop(speaker, None)

    def speakers(self) -> list[Hashable]:
        with self._lock:
            return list(self._speakers)

    # ---- one speaker's audio, under the lock ---------------------------------------------------------

    def _judge(self, speaker: Hashable, state: _Speaker, chunk: np.ndarray, now: float) -> Turn | None:
        probability = state.detector.probability(chunk)
        if not state.speaking:
            if probability < SPEECH_ON:
                state.preroll.append(chunk)
                return None
            state.speaking, state.chunks = True, list(state.preroll)
            state.preroll.clear()
            state.speech_ms = state.silence_ms = 0
            state.announced = state.asked = False
            state.over_bot = self.talking()
            state.turns += 1
        state.chunks.append(chunk)
        if probability >= SPEECH_OFF:
            state.speech_ms += CHUNK_MS
            state.silence_ms = 0
            state.asked = False  # a new pause will be judged on its own
            state.last_speech_at = now
        else:
            state.silence_ms += CHUNK_MS
        if not state.announced and state.speech_ms >= self.taking_ms:
            state.announced = True
            self.on_speech(speaker)
        if state.silence_ms >= self.config.silence_ms:
            return self._end(speaker, state, now, "silence")
        if len(state.chunks) * CHUNK >= self.config.max_turn_s * RATE:
            return self._end(speaker, state, now, "cut")
        return None

    def _end(self, speaker: Hashable, state: _Speaker, now: float, ended_by: str) -> Turn | None:
        """Close the turn; None when it held too little speech to count."""
        chunks, speech_ms, silence_ms = state.chunks, state.speech_ms, state.silence_ms
        state.speaking, state.chunks = False, []
        state.speech_ms = state.silence_ms = 0
        if speech_ms < self.config.min_speech_ms:
            return None
        drop = max(0, silence_ms - TAIL_MS) // CHUNK_MS  # most of the trailing silence says nothing
        audio = np.concatenate(chunks[:len(chunks) - drop] if drop else chunks)
        return Turn(speaker, audio, speech_ms / 1000, state.last_speech_at, now, ended_by,
                    state.over_bot or self.talking())
