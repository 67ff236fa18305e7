# The feature code below follows pipecat's pipecat/audio/turn/smart_turn/_whisper_features.py, under
# this notice:
#
#   BSD 2-Clause License
#
#   Copyright (c) 2024-2026, Daily
#
#   Redistribution and use in source and binary forms, with or without modification, are permitted
#   provided that the following conditions are met:
#
#   1. Redistributions of source code must retain the above copyright notice, this list of conditions
#      and the following disclaimer.
#
#   2. Redistributions in binary form must reproduce the above copyright notice, this list of
#      conditions and the following disclaimer in the documentation and/or other materials provided
#      with the distribution.
#
#   THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR
#   IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
#   FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR
#   CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
#   DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE,
#   DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER
#   IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT
#   OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
#
#   Portions derived from Hugging Face Transformers (feature_extraction_whisper.py, audio_utils.py),
#   Copyright 2022-2023 The HuggingFace Inc. team and the librosa & torchaudio authors, licensed under
#   the Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0); modified by Daily,
#   and rewritten here.

"""Smart Turn v3.2: whether a person's turn is complete, judged from the sound of it (its prosody),
so that a turn ends when the sentence ends, not after a fixed silence.

The model (pipecat's, BSD-2-Clause, Copyright (c) 2024-2026 Daily; 8.7 MB int8 ONNX for CPUs,
about 12-45 ms a decision) ships inside the `pipecat-ai` wheel; it is loaded from the installed
package's files with onnxruntime, and pipecat itself is never imported (its dependencies are heavy:
install it with `pip install --no-deps pipecat-ai==1.14.0`). It hears the last 8 s of a turn at
16 kHz as Whisper's log-mel features, computed here in numpy the way pipecat's
`_whisper_features.py` computes them (notice above; it derives them from Hugging Face transformers'
WhisperFeatureExtractor): the same values, checked against transformers in the tests.
Audio shorter than 8 s is zero-padded at the start, as pipecat does.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from core.config.schema import ListenSection
from core.loading import Shared

RATE = 16_000
WINDOW = 8 * RATE  # what the model hears
N_FFT, HOP, N_MELS = 400, 160, 80
# The model's probability above which a turn is complete. pipecat uses 0.5; cutting someone off costs more
# than answering 0.6 s later (at the silence cap), and here 0.7 kept a 600 ms pause after "park," one turn
# in 20 of 20 Piper renditions (0.5: 17) while 19 of 20 questions still ended at once (0.5: 20).
COMPLETE = 0.7
PACKAGE = "pipecat-ai"
MODEL_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"


def smart_turn_model() -> Path | None:
    """The Smart Turn v3.2 ONNX file of the installed pipecat-ai, or None when it is not installed."""
    try:
        path = Path(metadata.distribution(PACKAGE).locate_file(MODEL_FILE))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def turn_model_in_use(section: ListenSection) -> str:
    """`voice.listen.turn_model`, or when it is null: smart-turn if its model is installed, else silence."""
    if section.turn_model is not None:
        return section.turn_model
    return "smart-turn" if smart_turn_model() is not None else "silence"


def _mel_filters() -> np.ndarray:
    """Whisper's 80 triangular mel filters over 0-8 kHz (Slaney scale and area normalisation), [80, 201]."""
    def to_mel(hz):
        hz = np.asarray(hz, dtype=np.float64)
        return np.where(hz >= 1000, 15 + np.log(np.maximum(hz, 1e-10) / 1000) * (27 / np.log(6.4)), 3 * hz / 200)

    def to_hz(mel):
        return np.where(mel >= 15, 1000 * np.exp((mel - 15) * (np.log(6.4) / 27)), 200 * mel / 3)

    edges = to_hz(np.linspace(to_mel(0.0), to_mel(RATE / 2), N_MELS + 2))
    bins = np.linspace(0, RATE // 2, N_FFT // 2 + 1)
    low, middle, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (bins - low) / (middle - low), (high - bins) / (high - middle)
    return np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (high - low))


_FILTERS = _mel_filters()
_HANN = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic


def features(audio: np.ndarray) -> np.ndarray:
    """The model's input for 16 kHz mono audio: its last 8 s (zero-padded at the start) as float32 [80, 800]."""
    x = np.asarray(audio, dtype=np.float32).reshape(-1)[-WINDOW:]
    x = np.pad(x, (WINDOW - x.size, 0))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    x = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _HANN, axis=-1)) ** 2
    mel = np.log10(np.maximum(_FILTERS @ power.T, 1e-10))[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


class SmartTurn:
    """The loaded model; `complete` may be called from several threads (onnxruntime sessions allow it)."""

    def __init__(self, path: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self.path = path
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                    providers=["CPUExecutionProvider"])

    def probability(self, audio: np.ndarray) -> float:
        """How likely the turn in `audio` (16 kHz mono float32, its trailing silence included) is complete."""
        (out,) = self.session.run(None, {"input_features": features(audio)[None]})
        return float(out.reshape(-1)[0])

    def complete(self, audio: np.ndarray) -> bool:
        return self.probability(audio) > COMPLETE

    def release(self) -> None:
        _MODELS.release(self)


class TurnModelUnavailable(RuntimeError):
    """Smart Turn was asked for but cannot be loaded; the message says what to do."""


_MODELS: Shared[SmartTurn] = Shared()


def acquire_smart_turn() -> SmartTurn:
    """The process's Smart Turn model, loaded on first use (blocking); raises TurnModelUnavailable."""
    path = smart_turn_model()
    if path is None:
        raise TurnModelUnavailable("voice.listen.turn_model is smart-turn, but its model is not installed: "
                                   "pip install --no-deps pipecat-ai==1.14.0 (or set voice.listen.turn_model: silence)")
    try:
        return _MODELS.acquire(path, lambda: SmartTurn(path))
    except ImportError:
        raise TurnModelUnavailable("Smart Turn needs onnxruntime: pip install 'talk-to-transformers[listen]'") from None
    except Exception as exc:  # noqa: BLE001 - a damaged model file: say which
        raise TurnModelUnavailable(f"could not load Smart Turn from {path}: {exc}") from None
