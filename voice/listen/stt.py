"""Speech to text: the interface every Whisper engine offers, chosen by `voice.listen.engine`.

    stt = load_stt(config.voice.listen)           # factory.py; blocking: call it off the event loop
    texts = stt.transcribe([audio, audio, ...])   # 16 kHz mono float32 clips -> their texts, as one batch

`transformers` (transformers_engine.py) runs a Whisper checkpoint in transformers format (a hub id
or a local directory); `faster-whisper` (faster_whisper_engine.py) runs CTranslate2 (faster on
CPU). Both batch the clips of one call and use CUDA when present. Engines are not thread-safe: the
transcriber's worker thread is their only caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

DEFAULT_MODELS = {"transformers": "openai/whisper-base.en", "faster-whisper": "base.en"}
MAX_NEW_TOKENS = 128  # a turn is at most 30 s; Whisper writes about 4 tokens a second of speech


class SttUnavailable(RuntimeError):
    """The speech-to-text engine or model cannot be used; the message says what to do."""


class SpeechToText(ABC):
    name: str
    device: str
    max_seconds: float  # the longest audio the model hears at once

    @abstractmethod
    def transcribe(self, clips: list[np.ndarray]) -> list[str]:
        """The text of each 16 kHz mono float32 clip, in order (one batch)."""
