"""The transformers engine: Whisper in transformers format (float16 on CUDA, float32 on CPU)."""

from __future__ import annotations

import copy

import numpy as np

from voice.listen.stt import MAX_NEW_TOKENS, SpeechToText, SttUnavailable


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
                model_id, dtype=torch.float16 if device.startswith("cuda") else torch.float32
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
