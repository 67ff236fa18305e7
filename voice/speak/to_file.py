"""`ttt say`: one text spoken in a voice into a WAV file, through the same path as chat replies."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.config.schema import VoiceSection
from core.metrics import Metrics
from core.replies import ReplyUpdate
from voice.speak.clips import write_wav
from voice.speak.tts import VoiceUnavailable
from voice.speak.registry import VoiceError
from voice.speak.speech import Speech


async def speak_to_file(section: VoiceSection, text: str, voice: str | None, path: Path) -> float:
    """Speak `text` in `voice` (None: the engine's default) into `path`; returns its length in seconds.
    Raises VoiceError or VoiceUnavailable (also when synthesis fails)."""
    speech = Speech(section, Metrics())
    await speech.start()
    try:
        rate = speech.engine.sample_rate
        reply = speech.reply(voice, adapter="cli", label=str(path), rate=rate, channels=1, frame_ms=None)
        pieces: list[bytes] = []
        try:
            await reply.on_update(ReplyUpdate(text, final=True))
            await reply.synthesized.wait()
            while piece := reply.output.read(timeout=0):
                pieces.append(piece)
        finally:
            reply.finish("spoken")
        if isinstance(reply.error, (VoiceError, VoiceUnavailable)):
            raise reply.error
        if reply.error is not None:
            raise VoiceUnavailable(f"synthesis failed: {reply.error}") from reply.error
        samples = np.frombuffer(b"".join(pieces), dtype="<i2").astype(np.float32) / 32768.0
        try:
            with path.open("wb") as file:
                write_wav(file, samples, rate)
        except OSError as exc:
            raise VoiceError(f"cannot write {path}: {exc.strerror or exc}") from None
        return len(samples) / rate
    finally:
        await speech.close()
