"""Hearing: listening for one service, over the process's shared speech-to-text model.

    hearing = Hearing(config.voice.listen, metrics); await hearing.start()    # raises SttUnavailable
    room = hearing.room("guild 1", on_transcript=..., on_barge_in=..., talking=...)   # one per place people talk
    room.hear(person, pcm)           # 20 ms of 48 kHz stereo s16le, from any thread, as it arrives
    room.stopped_sending(person)     # their client says it stopped sending (e.g. Discord's silence frames)
    room.forget(person); room.close()
    await hearing.close()

A room cuts each person's audio into turns (turns.py: voice activity, then the turn model's
judgement (smart_turn.py) or silence, or a cap), a ticker thread judges and ends the turns whose
audio stopped coming, and the shared transcriber (transcriber.py) writes them down off the event
loop. Its callbacks run on the event loop: `on_barge_in(person)` when someone takes the turn while
the bot talks (`talking()`; the rules are in barge_in.py), and `on_transcript(person, transcript)`
for each turn written down; a backchannel said over the bot is not one. The speaking side mirrors
it (voice/speak/speech.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Callable, Hashable

from core.config.schema import ListenSection
from core.loading import LoadOnce
from core.metrics import Metrics
from voice.listen.barge_in import backchannel, takes_the_turn
from voice.listen.smart_turn import SmartTurn, acquire_smart_turn, turn_model_in_use
from voice.listen.stt import describe_model
from voice.listen.transcriber import Transcriber, Transcript, acquire_transcriber
from voice.listen.turns import Turn, TurnTaker

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often turns whose audio stopped coming are checked for their end

OnTranscript = Callable[[Hashable, Transcript], None]


class Hearing:
    def __init__(self, section: ListenSection, metrics: Metrics):
        self.section = section
        self.metrics = metrics
        self._transcriber: LoadOnce[Transcriber] = LoadOnce(lambda: acquire_transcriber(section), Transcriber.release)
        self.turns_end_by = turn_model_in_use(section)  # "smart-turn" or "silence", decided once
        self._turn_model: LoadOnce[SmartTurn] | None = None
        if self.turns_end_by == "smart-turn":
            self._turn_model = LoadOnce(acquire_smart_turn, SmartTurn.release)

    @property
    def transcriber(self) -> Transcriber | None:
        return self._transcriber.item

    @property
    def turn_model(self) -> SmartTurn | None:
        return None if self._turn_model is None else self._turn_model.item

    async def start(self) -> None:
        """Load the speech-to-text and turn models (once per process, off the event loop); raises
        SttUnavailable or TurnModelUnavailable."""
        if self.transcriber is not None and (self._turn_model is None or self.turn_model is not None):
            return
        if self._turn_model is not None:
            await self._turn_model.get()
        transcriber = await self._transcriber.get()
        log.info("listen: %s speech to text ready (%s on %s); turns end by %s", transcriber.stt.name,
                 describe_model(self.section), transcriber.stt.device, self.turns_end_by)

    async def close(self) -> None:
        await self._transcriber.close()
        if self._turn_model is not None:
            await self._turn_model.close()

    def room(self, name: str, *, on_transcript: OnTranscript,
             on_barge_in: Callable[[Hashable], None] = lambda person: None,
             talking: Callable[[], bool] = lambda: False) -> "Room":
        """A place where people talk (call it on the event loop: callbacks come back to it). `talking()`
        says whether the bot is talking there now (any thread)."""
        return Room(self, name, on_transcript, on_barge_in, talking)


class Room:
    """The people heard in one place: their turns, ended by a ticker thread, written down by the
    shared transcriber."""

    def __init__(self, hearing: Hearing, name: str, on_transcript: OnTranscript,
                 on_barge_in: Callable[[Hashable], None], talking: Callable[[], bool]):
        self.hearing = hearing
        self.name = name
        self.on_transcript = on_transcript
        self.on_barge_in = on_barge_in
        self.talking = talking
        self.loop = asyncio.get_running_loop()
        self.turns = TurnTaker(hearing.section, on_turns=self._turns_ended, on_speech=self._speech_taking,
                               turn_model=hearing.turn_model, talking=talking)
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name=f"listen-{name}", daemon=True)
        self._ticker.start()

    def hear(self, person: Hashable, pcm: bytes) -> None:
        """Take 20 ms of a person's audio (any thread)."""
        self.turns.hear(person, pcm)

    def stopped_sending(self, person: Hashable) -> None:
        """This person's client stopped sending audio: what follows is a pause, not late audio (any thread)."""
        self.turns.stopped_sending(person)

    def forget(self, person: Hashable) -> None:
        """Drop what this person was saying (they left, or asked not to be heard)."""
        self.turns.forget(person)

    def forget_everyone(self) -> None:
        for person in self.turns.speakers():
            self.turns.forget(person)

    def close(self) -> None:
        self._stopped.set()
        self.forget_everyone()

    # ---- receiving and ticking threads ---------------------------------------------------------

    def _tick(self) -> None:
        while not self._stopped.wait(TICK_S):
            try:
                self.turns.tick()
            except Exception:  # noqa: BLE001 - never lose the ticker
                log.exception("listen: ending turns failed in %s", self.name)

    def _turns_ended(self, turns: list[Turn]) -> None:
        transcriber = self.hearing.transcriber
        if transcriber is not None:
            transcriber.submit([(turn, self._transcribed) for turn in turns])

    def _transcribed(self, transcript: Transcript | None, error: Exception | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to answer
            self.loop.call_soon_threadsafe(self._written_down, transcript, error)

    def _speech_taking(self, person: Hashable) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._barge_in, person, "speech")

    # ---- event loop ----------------------------------------------------------------------------

    def _written_down(self, transcript: Transcript | None, error: Exception | None) -> None:
        metrics = self.hearing.metrics
        if error is not None:
            metrics.voice_turns.labels("failed").inc()
            return
        transcriber = self.hearing.transcriber
        metrics.voice_transcription.labels(transcriber.stt.name if transcriber else "?").observe(
            transcript.transcription_s)
        turn, text = transcript.turn, transcript.text
        if text is not None and (turn.over_bot or self.talking()):
            if backchannel(text):
                metrics.voice_turns.labels("backchannel").inc()
                log.info("listen: a backchannel over the bot in %s (speech=%.2fs): not a turn", self.name, turn.speech_s)
                return
            if turn.speech_s * 1000 < self.turns.taking_ms and takes_the_turn(text):  # too short to have barged in
                self._barge_in(turn.speaker, "words")
        self.on_transcript(turn.speaker, transcript)

    def _barge_in(self, person: Hashable, by: str) -> None:
        if self.hearing.section.barge_in and self.talking():
            log.info("listen: %s takes the turn in %s (by %s): the bot stops talking", person, self.name, by)
            self.on_barge_in(person)
