"""Voice activity detection with Silero VAD (MIT; the model ships inside the `silero-vad` wheel).

One detector per speaker: the model carries its recurrent state from chunk to chunk, so two people's
audio must never share one. Each call takes 32 ms (512 samples at 16 kHz) and says how likely it is
speech.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

RATE = 16_000
CHUNK = 512  # samples per decision at 16 kHz (what Silero VAD takes)
CHUNK_MS = CHUNK * 1000 // RATE

_model_lock = threading.Lock()


class SpeechDetector:
    """Speech probability of consecutive 32 ms chunks of one speaker's 16 kHz audio."""

    def __init__(self) -> None:
        self._model = _load()

    def probability(self, chunk: np.ndarray) -> float:
        with torch.inference_mode():
            return float(self._model(torch.from_numpy(chunk), RATE))

    def reset(self) -> None:
        """Forget the audio so far (the speaker was silent, a new stretch of speech begins)."""
        self._model.reset_states()


def _load():
    threads = torch.get_num_threads()
    try:
        with _model_lock:
            from silero_vad import load_silero_vad

            return load_silero_vad()
    except ImportError:
        raise RuntimeError("listening needs the listen extra: pip install 'talk-to-transformers[listen]'") from None
    finally:
        torch.set_num_threads(threads)  # importing silero_vad calls torch.set_num_threads(1)
