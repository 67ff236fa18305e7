"""Speech: spoken replies for one service, over the process's shared synthesis worker.

    speech = Speech(config.voice, metrics); await speech.start()
    reply = speech.reply("alice", adapter="discord", label="guild 1")   # raises VoiceBusy when full
    await reply.on_update(update)      # every ReplyUpdate of the chat reply, as it is written
    ... read reply.output (PCM) from the first `reply.ready` until it ends ...
    reply.finish("spoken")             # always: frees the slot, logs one line, counts metrics

The listening side mirrors it: voice/listen/hearing.py.
"""

from __future__ import annotations

import logging

from core.config.schema import VoiceSection
from core.loading import LoadOnce
from core.metrics import Metrics
from voice.speak.pcm import DISCORD_CHANNELS, DISCORD_RATE, FRAME_MS, PcmStream
from voice.speak.registry import VoiceRegistry, VoiceStates
from voice.speak.reply import SpokenReply
from voice.speak.tts import TextToSpeech, VoiceUnavailable
from voice.speak.worker import SynthesisWorker, acquire_worker

log = logging.getLogger(__name__)


class Speech:
    def __init__(self, section: VoiceSection, metrics: Metrics):
        self.section = section
        self.metrics = metrics
        self.registry = VoiceRegistry(section.voices_dir)
        self.states = VoiceStates(self.registry)
        self._worker: LoadOnce[SynthesisWorker] = LoadOnce(lambda: acquire_worker(section), SynthesisWorker.release)

    @property
    def worker(self) -> SynthesisWorker | None:
        return self._worker.item

    @property
    def engine(self) -> TextToSpeech:
        if self.worker is None:
            raise VoiceUnavailable("the voice engine is not loaded yet")
        return self.worker.engine

    async def start(self) -> None:
        """Load the engine (once per process, off the event loop); raises VoiceUnavailable."""
        if self.worker is not None:
            return
        worker = await self._worker.get()
        log.info("voice: %s engine ready (%s on %s)",
                 worker.engine.name, self.section.model or "default model", worker.engine.device)

    async def close(self) -> None:
        await self._worker.close()

    def reply(self, voice: str | None, *, adapter: str, label: str, rate: int = DISCORD_RATE,
              channels: int = DISCORD_CHANNELS, frame_ms: int | None = FRAME_MS) -> SpokenReply:
        """A reply to speak in `voice` (None: the engine's default voice). Raises VoiceBusy when the queue
        is full, VoiceUnavailable when the engine is not loaded or the persona may not speak."""
        if voice is None and self.section.require_registered:
            raise VoiceUnavailable("the persona has no registered voice (voice.require_registered is on)")
        engine = self.engine
        self.metrics.voice_queue_depth.set(self.worker.reserve())
        output = PcmStream(engine.sample_rate, rate, channels, frame_ms)
        return SpokenReply(self.worker, self.states, voice, output, self.metrics, language=self.section.language,
                           adapter=adapter, label=label)
