"""Reference clips: read any audio file, check it can carry a voice, normalise it for storage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

CLIP_RATE = 24_000  # normalised clips: mono, 24 kHz (what the engines sample at), 16-bit WAV
MIN_CLIP_S = 3.0
MAX_CLIP_S = 30.0
PEAK = 0.89  # -1 dBFS after normalisation
# "Not silent": at least this much of the clip in 20 ms windows louder than SPEECH_DBFS.
SPEECH_DBFS = -40.0
MIN_SPEECH_S = 0.5


class ClipError(ValueError):
    """A reference clip that cannot be used; the message says why, for the person who gave it."""


@dataclass(frozen=True)
class Clip:
    """A validated clip, normalised: mono float32 at CLIP_RATE, peak at -1 dBFS."""

    source: str
    samples: np.ndarray
    source_rate: int
    source_channels: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / CLIP_RATE


def load_clip(path: Path) -> Clip:
    """Read, check (3-30 s, not silent) and normalise one reference clip; raises ClipError."""
    name = path.name
    if path.is_dir():
        raise ClipError(f"{path}: a folder, not an audio file")
    if not path.is_file():
        raise ClipError(f"{path}: no such file")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except PermissionError:
        raise ClipError(f"{path}: cannot be read (permission denied)") from None
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise ClipError(f"{path}: not readable as audio ({_reason(exc)})") from None
    channels = data.shape[1]
    seconds = data.shape[0] / rate if rate else 0.0
    if not MIN_CLIP_S <= seconds <= MAX_CLIP_S:
        raise ClipError(
            f"{path}: {seconds:.1f} s long; a reference clip must last {MIN_CLIP_S:.0f} to {MAX_CLIP_S:.0f} s"
        )
    mono = data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise ClipError(f"{path}: holds invalid samples (NaN or infinity)")
    if rate != CLIP_RATE:
        mono = soxr.resample(mono, rate, CLIP_RATE)
    if speech_seconds(mono, CLIP_RATE) < MIN_SPEECH_S:
        raise ClipError(
            f"{path}: silent (less than {MIN_SPEECH_S} s above {SPEECH_DBFS:.0f} dBFS); record the voice again"
        )
    mono = mono * (PEAK / float(np.abs(mono).max()))
    return Clip(name, mono.astype(np.float32), int(rate), int(channels))


def speech_seconds(samples: np.ndarray, rate: int) -> float:
    """Seconds of 20 ms windows whose loudness is above SPEECH_DBFS."""
    window = rate // 50
    count = len(samples) // window
    if count == 0:
        return 0.0
    frames = samples[: count * window].reshape(count, window).astype(np.float64)
    rms = np.sqrt((frames**2).mean(axis=1))
    loud = rms > 10 ** (SPEECH_DBFS / 20)
    return float(loud.sum()) / 50


def write_wav(path: Path | BinaryIO, samples: np.ndarray, rate: int) -> None:
    """Mono float samples as a 16-bit PCM WAV file (a path, or a file open for writing)."""
    target = str(path) if isinstance(path, Path) else path
    soundfile.write(target, np.clip(samples, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")


def read_wav(path: Path, rate: int) -> np.ndarray:
    """A stored clip as mono float32 at `rate`."""
    data, found = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    return mono if found == rate else soxr.resample(mono, found, rate).astype(np.float32)


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[-1] if text.startswith("Error opening") else text
