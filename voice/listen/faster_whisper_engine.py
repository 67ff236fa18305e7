"""The faster-whisper engine: Whisper on CTranslate2 (int8 on CPU, the model's own type on CUDA).

faster-whisper's own `transcribe()` takes one recording at a time; the turns of one batch are
instead encoded and decoded together through its CTranslate2 model, greedily, with the same prompt
and feature extraction that `transcribe()` uses. The encoder hears a window just longer than the
batch's longest turn, in steps of WINDOW_STEP_S, rather than Whisper's fixed 30 s: a turn of a few
seconds then costs a third of the encoder's work, with the same transcripts on the test sentences
(a shorter window than 10 s began to drop words). On the CPU it runs int8 weights on one thread
(2.7x faster than float32 for tiny.en here), leaving the other cores to the chat model.
"""

from __future__ import annotations

import math

import numpy as np

from voice.listen.stt import MAX_NEW_TOKENS, SpeechToText, SttUnavailable

WINDOW_STEP_S = 10


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
                                 "pip install 'talk-to-transformers[listen]'") from None
        try:
            kind, _, index = device.partition(":")  # CTranslate2 takes the GPU's index apart
            on_cpu = kind == "cpu"
            whisper = WhisperModel(model, device=kind, device_index=int(index or 0),
                                   compute_type="int8" if on_cpu else "default", cpu_threads=1 if on_cpu else 0)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SttUnavailable(f"could not load faster-whisper model {model!r}: {exc}") from None
        return cls(whisper, device, language)

    def transcribe(self, clips: list[np.ndarray]) -> list[str]:
        from faster_whisper.audio import pad_or_trim

        extractor = self.whisper.feature_extractor
        longest = max(len(clip) for clip in clips) / extractor.sampling_rate
        window_s = min(self.max_seconds, WINDOW_STEP_S * max(1, math.ceil(longest / WINDOW_STEP_S)))
        frames = round(window_s * extractor.sampling_rate / extractor.hop_length)
        features = np.stack([pad_or_trim(extractor(clip), frames) for clip in clips])
        encoded = self.whisper.encode(features)
        results = self.whisper.model.generate(
            encoded, [self.prompt] * len(clips), beam_size=1, max_length=len(self.prompt) + MAX_NEW_TOKENS,
            suppress_blank=True, suppress_tokens=[-1],
        )
        return [self.tokenizer.decode(result.sequences_ids[0]).strip() for result in results]
