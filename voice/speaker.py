"""Speaker: spoken replies for one service, over the process's shared synthesis worker.

    speaker = Speaker(config.voice, metrics); await speaker.start()
    reply = speaker.reply("alice", adapter="discord", label="guild 1")   # raises VoiceBusy when full
    await reply.on_update(update)      # every ReplyUpdate of the chat reply, as it is written
    ... read reply.output (PCM) from the first `reply.ready` until it ends ...
    reply.finish("spoken")             # always: frees the slot, logs one line, counts metrics
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from core.config import VoiceSection
from core.metrics import Metrics
from voice.engine import Engine, VoiceState, VoiceUnavailable
from voice.pcm import DISCORD_CHANNELS, DISCORD_RATE, FRAME_MS, PcmStream
from voice.registry import VoiceRegistry
from voice.reply import SpokenReply
from voice.worker import SynthesisWorker, VoiceBusy, acquire_worker

log = logging.getLogger(__name__)

__all__ = ["Speaker", "SpokenReply", "VoiceBusy", "VoiceUnavailable"]


class Speaker:
    def __init__(self, section: VoiceSection, metrics: Metrics):
        self.section = section
        self.metrics = metrics
        self.registry = VoiceRegistry(section.voices_dir)
        self.worker: SynthesisWorker | None = None
        self._loading: asyncio.Task | None = None
        self._states: dict[str, tuple[Path, VoiceState]] = {}  # voice name -> (cache file, state); worker thread only

    @property
    def engine(self) -> Engine:
        if self.worker is None:
            raise VoiceUnavailable("the voice engine is not loaded yet")
        return self.worker.engine

    async def start(self) -> None:
        """Load the engine (once per process, off the event loop); raises VoiceUnavailable."""
        if self.worker is not None:
            return
        if self._loading is None or (self._loading.done() and self._loading.exception() is not None):
            self._loading = asyncio.ensure_future(asyncio.to_thread(acquire_worker, self.section))
        worker = await asyncio.shield(self._loading)
        if self.worker is None:
            self.worker = worker
            engine = worker.engine
            log.info("voice: %s engine ready (%s on %s)",
                     engine.name, self.section.model or "default model", engine.device)

    async def close(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self.worker is not None:
            worker, self.worker = self.worker, None
            await asyncio.to_thread(worker.release)

    def reply(self, voice: str | None, *, adapter: str, label: str, rate: int = DISCORD_RATE,
              channels: int = DISCORD_CHANNELS, frame_ms: int | None = FRAME_MS) -> SpokenReply:
        """A reply to speak in `voice` (None: the engine's default voice). Raises VoiceBusy when the queue
        is full, VoiceUnavailable when the engine is not loaded or the persona may not speak."""
        if voice is None and self.section.require_registered:
            raise VoiceUnavailable("the persona has no registered voice (voice.require_registered is on)")
        engine = self.engine
        self.worker.reserve()
        self.metrics.voice_queue_depth.set(self.worker.replies)
        output = PcmStream(engine.sample_rate, rate, channels, frame_ms)
        return SpokenReply(self, voice, output, adapter=adapter, label=label)

    def released(self) -> None:
        """A reply gave its slot back (SpokenReply.finish)."""
        if self.worker is not None:
            self.worker.unreserve()
            self.metrics.voice_queue_depth.set(self.worker.replies)

    def voice_state(self, voice: str | None, engine: Engine) -> VoiceState:
        """The state to synthesize `voice` with; called in the worker thread only."""
        if voice is None:
            state = engine.default_state()
            if state is None:
                raise VoiceUnavailable(
                    f"this {engine.name} model has no default voice: give the persona a registered voice"
                )
            return state
        registered = self.registry.get(voice)
        path = self.registry.state_path(registered, engine)
        cached = self._states.get(voice)
        if cached is None or cached[0] != path:  # first use, or the clips or the model changed
            cached = self._states[voice] = (path, self.registry.state(registered, engine))
        return cached[1]
