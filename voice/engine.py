"""Text-to-speech engines behind one small interface, chosen by `voice.engine`.

An engine clones a voice from reference clips into an opaque voice state, saves and loads
that state, and streams speech for one sentence as float32 mono chunks at its sample rate.
Engines are not thread-safe: the synthesis worker (voice/worker.py) is their only caller.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from core.config import VoiceSection
from core.threads import model_loading

VoiceState = Any  # engine-specific; only the engine that made it reads it


class VoiceUnavailable(RuntimeError):
    """The engine, its weights or a voice cannot be used; the message says what to do."""


class Engine(ABC):
    name: str  # "pocket" | "xtts"
    sample_rate: int
    model_id: str  # identifies the loaded weights in voice-state cache keys
    reads_numbers: bool  # its own text normalisation reads numbers and abbreviations aloud
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


def load_engine(section: VoiceSection) -> Engine:
    """Load the configured engine and model (downloads on first use); raises VoiceUnavailable."""
    with model_loading():  # never next to another model's load in this process (see core.threads)
        return _load_engine(section)


def _load_engine(section: VoiceSection) -> Engine:
    if section.engine == "pocket":
        from voice.pocket_engine import PocketEngine

        return PocketEngine.load(section.model, pick_device(section.device))
    from voice.xtts_engine import XttsEngine

    return XttsEngine.load(section.model, pick_device(section.device), section.language)


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise VoiceUnavailable("voice.device is cuda, but torch sees no CUDA device")
    return wanted


def file_identity(path: Path) -> str:
    """A cheap identity of a local weights file: its path, size and modification time."""
    info = path.stat()
    return f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}"
