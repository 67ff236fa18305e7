"""The faster-whisper engine: Whisper on CTranslate2 (int8 on CPU, float16 on CUDA).

faster-whisper's own `transcribe()` takes one recording at a time; the turns of one batch are
instead encoded and decoded together through its CTranslate2 model, greedily, with the same prompt
and feature extraction that `transcribe()` uses.
"""

from __future__ import annotations

import numpy as np

from voice.listen.stt import MAX_NEW_TOKENS, SpeechToText, SttUnavailable


class FasterWhisper(SpeechToText):
    name = "faster-whisper"

    def __init__(self, whisper, device: str, language: str | None):
        from faster_whisper.tokenizer import Tokenizer

        self.whisper = whisper
        self.device = device
        extractor = whisper.feature_extractor
        self.max_seconds = extractor.n_samples / extractor.sampling_rate
        multilingual = whisper.model.is_multilingual
        self.tokenizer = Tokenizer(whisper.hf_tokenizer, multilingual, task="transcribe",
                                   language=(language or "en") if multilingual else None)
        self.prompt = [*self.tokenizer.sot_sequence, self.tokenizer.no_timestamps]

    @classmethod
    def load(cls, model: str, device: str, language: str | None) -> "FasterWhisper":
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise SttUnavailable("voice.listen.engine is faster-whisper, but it is not installed: "
                                 "pip install 'talk-to-transformers[faster-whisper]'") from None
        try:
            kind, _, index = device.partition(":")  # CTranslate2 takes the GPU's index apart
            whisper = WhisperModel(model, device=kind, device_index=int(index or 0), compute_type="default")
        except (OSError, ValueError, RuntimeError) as exc:
            raise SttUnavailable(f"could not load faster-whisper model {model!r}: {exc}") from None
        return cls(whisper, device, language)

    def transcribe(self, clips: list[np.ndarray]) -> list[str]:
        from faster_whisper.audio import pad_or_trim

        extractor = self.whisper.feature_extractor
        features = np.stack([pad_or_trim(extractor(clip), extractor.nb_max_frames) for clip in clips])
        encoded = self.whisper.encode(features)
        results = self.whisper.model.generate(
            encoded, [self.prompt] * len(clips), beam_size=1, max_length=len(self.prompt) + MAX_NEW_TOKENS,
            suppress_blank=True, suppress_tokens=[-1],
        )
        return [self.tokenizer.decode(result.sequences_ids[0]).strip() for result in results]
