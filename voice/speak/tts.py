"""Text to speech: the interface every engine offers (pocket, xtts, piper), chosen by `voice.engine`.

An engine clones a voice from reference clips into an opaque voice state, saves and loads
that state, and streams speech for one sentence as float32 mono chunks at its sample rate.
An engine that cannot clone (piper) speaks every reply in its own default voice.
Engines are not thread-safe: the synthesis worker (worker.py) is their only caller; factory.py
loads the configured one.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import numpy as np

VoiceState = Any  # engine-specific; only the engine that made it reads it


class VoiceUnavailable(RuntimeError):
    """The engine, its weights or a voice cannot be used; the message says what to do."""


class TextToSpeech(ABC):
    name: str  # "pocket" | "xtts" | "piper"
    sample_rate: int
    model_id: str  # identifies the loaded weights in voice-state cache keys
    reads_numbers: bool  # its own text normalisation reads numbers and abbreviations aloud
    clones: bool = True  # makes voice states from reference clips (registered voices)
    device: str

    @abstractmethod
    def clone(self, clips: list[np.ndarray], rate: int) -> VoiceState:
        """The voice state of a speaker from mono float32 clips sampled at `rate`."""

    @abstractmethod
    def save_state(self, state: VoiceState, path: Path) -> None:
        """Write a voice state (safetensors) so that `load_state` restores it exactly."""

    @abstractmethod
    def load_state(self, path: Path) -> VoiceState:
        """Read what `save_state` wrote."""

    @abstractmethod
    def default_state(self) -> VoiceState | None:
        """The engine's own default voice, or None when this model has none."""

    @abstractmethod
    def synthesize(self, state: VoiceState, text: str, stop: threading.Event) -> Iterator[np.ndarray]:
        """Speech for one sentence as float32 mono chunks at `sample_rate`; ends early once `stop` is set."""


def file_identity(path: Path) -> str:
    """A cheap identity of a local weights file: its path, size and modification time."""
    info = path.stat()
    return f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}"
