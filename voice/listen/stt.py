"""Speech to text with Whisper, behind one small interface chosen by `voice.listen.engine`.

    stt = load_stt(config.voice.listen)           # blocking: call it off the event loop
    texts = stt.transcribe([audio, audio, ...])   # 16 kHz mono float32 clips -> their texts, as one batch

`transformers` runs a Whisper checkpoint in transformers format (a hub id or a local directory);
`faster-whisper` runs CTranslate2 (faster on CPU; only when installed and selected). Both batch the
clips of one call and use CUDA when present. Engines are not thread-safe: the transcriber's worker
thread is their only caller.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod

import numpy as np

from core.config import ListenSection
from core.threads import model_loading

log = logging.getLogger(__name__)

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


def load_stt(section: ListenSection) -> SpeechToText:
    """Load the configured engine and model (downloads on first use); raises SttUnavailable."""
    with model_loading():  # never next to another model's load in this process (see core.threads)
        return _load_stt(section)


def _load_stt(section: ListenSection) -> SpeechToText:
    model = section.model or DEFAULT_MODELS[section.engine]
    device = _device(section.device)
    if section.engine == "faster-whisper":
        from voice.listen.faster_whisper_engine import FasterWhisper

        return FasterWhisper.load(model, device, section.language)
    return TransformersWhisper.load(model, device, section.language)


def _device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise SttUnavailable("voice.listen.device is cuda, but torch sees no CUDA device")
    return wanted


class TransformersWhisper(SpeechToText):
    name = "transformers"

    def __init__(self, model, processor, device: str, language: str | None):
        self.model = model
        self.processor = processor
        self.device = device
        self.language = language
        extractor = processor.feature_extractor
        self.max_seconds = extractor.n_samples / extractor.sampling_rate
        self.generation = copy.deepcopy(model.generation_config)
        self.generation.max_new_tokens = min(MAX_NEW_TOKENS, model.config.max_target_positions // 2)
        self.generation.max_length = None
        # English-only checkpoints (*.en) take neither a language nor a task.
        config = model.generation_config
        multilingual = getattr(config, "is_multilingual", None)
        self._multilingual = bool(getattr(config, "lang_to_id", None)) if multilingual is None else multilingual

    @classmethod
    def load(cls, model_id: str, device: str, language: str | None) -> "TransformersWhisper":
        import torch
        from transformers import AutoProcessor, WhisperForConditionalGeneration

        try:
            processor = AutoProcessor.from_pretrained(model_id)
            model = WhisperForConditionalGeneration.from_pretrained(
                model_id, dtype=torch.float16 if device == "cuda" else torch.float32
            )
        except (OSError, ValueError) as exc:
            raise SttUnavailable(f"could not load Whisper model {model_id!r}: {exc}") from None
        model.to(device).eval()
        return cls(model, processor, device, language)

    def transcribe(self, clips: list[np.ndarray]) -> list[str]:
        import torch

        features = self.processor.feature_extractor(
            clips, sampling_rate=16_000, return_tensors="pt", return_attention_mask=True
        )
        inputs = features.input_features.to(self.device, self.model.dtype)
        options = {"task": "transcribe", **({"language": self.language} if self.language else {})}
        options = options if self._multilingual else {}
        with torch.inference_mode():
            ids = self.model.generate(inputs, attention_mask=features.attention_mask.to(self.device),
                                      generation_config=copy.deepcopy(self.generation), **options)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]
