"""Engine audio to the PCM a listener needs: resampled with soxr, 16-bit, mono or stereo, in frames.

One PcmStream per spoken reply: a single resampler runs over all its sentences, so there is no
click at chunk or sentence boundaries. The synthesis worker writes; one reader (Discord's
player thread, an HTTP response, a file) reads. Audio written after `hold()` is kept from the
reader until `release()`: a sentence is handed out once it can be played without a gap. Discord wants 48 kHz stereo s16le in 20 ms
frames (3,840 bytes each).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import soxr

DISCORD_RATE = 48_000
DISCORD_CHANNELS = 2
FRAME_MS = 20


class PcmStream:
    def __init__(self, source_rate: int, rate: int = DISCORD_RATE, channels: int = DISCORD_CHANNELS,
                 frame_ms: int | None = FRAME_MS):
        self.source_rate, self.rate, self.channels = source_rate, rate, channels
        # None: hand out whatever is buffered, in whole samples.
        self.frame_bytes = rate * frame_ms // 1000 * channels * 2 if frame_ms else None
        self._resampler = soxr.ResampleStream(source_rate, rate, 1, dtype="float32") if source_rate != rate else None
        self._pending = bytearray()  # converted PCM not yet handed out
        self._held_from: int | None = None  # where in _pending the audio kept from the reader begins
        self._cond = threading.Condition()
        self._finished = False
        self._cancelled = False
        self.bytes_written = 0
        self.first_read_at: float | None = None  # time.monotonic() of the first audio handed out
        self._last_read_at: float | None = None
        self.longest_gap_s = 0.0  # longest wait between two pieces of audio once reading began

    @property
    def seconds_written(self) -> float:
        return self.bytes_written / (self.rate * self.channels * 2)

    @property
    def finished(self) -> bool:
        return self._finished

    def write(self, samples: np.ndarray) -> None:
        """Append mono float samples at `source_rate` (from the synthesis worker)."""
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(np.asarray(samples, dtype=np.float32))
        self._append(samples)

    def hold(self) -> None:
        """Keep the audio written from now on from the reader, until `release()`."""
        with self._cond:
            if self._held_from is None:
                self._held_from = len(self._pending)

    def release(self) -> None:
        """Hand out what `hold()` kept back."""
        with self._cond:
            self._held_from = None
            self._cond.notify_all()

    def finish(self) -> None:
        """No more audio: flush the resampler and pad the last frame with silence."""
        with self._cond:
            if self._finished:
                return
        if self._resampler is not None:
            self._append(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        with self._cond:
            if self.frame_bytes and len(self._pending) % self.frame_bytes:
                padding = self.frame_bytes - len(self._pending) % self.frame_bytes
                self._pending.extend(bytes(padding))
                self.bytes_written += padding
            self._finished = True
            self._held_from = None
            self._cond.notify_all()

    def cancel(self) -> None:
        """Drop what is buffered and end the stream (the reader gets b"" next)."""
        with self._cond:
            self._pending.clear()
            self._finished = self._cancelled = True
            self._cond.notify_all()

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next frame (or, without frames, all that is buffered); None if nothing came within
        `timeout` (an underrun); b"" once the stream has ended."""
        with self._cond:
            size = self.frame_bytes or 2 * self.channels
            if self._readable() < size and not self._finished:
                self._cond.wait_for(lambda: self._readable() >= size or self._finished, timeout)
            readable = self._readable()
            if readable < size:
                return b"" if self._finished else None
            take = self.frame_bytes or readable - readable % size
            piece = bytes(self._pending[:take])
            del self._pending[:take]
            if self._held_from is not None:
                self._held_from -= take
        now = time.monotonic()
        if self.first_read_at is None:
            self.first_read_at = now
        elif self._last_read_at is not None:
            self.longest_gap_s = max(self.longest_gap_s, now - self._last_read_at)
        self._last_read_at = now
        return piece

    def _readable(self) -> int:
        return len(self._pending) if self._held_from is None else self._held_from

    def starved(self) -> bool:
        """The reader has nothing it may read now (all written audio is played, or held)."""
        with self._cond:
            return self._readable() < (self.frame_bytes or 2 * self.channels)

    def buffered_seconds(self) -> float:
        """Audio written and not handed out yet (held or not), in seconds."""
        with self._cond:
            return len(self._pending) / (self.rate * self.channels * 2)

    def _append(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
        if self.channels > 1:
            pcm = np.repeat(pcm[:, None], self.channels, axis=1).reshape(-1)
        data = pcm.tobytes()
        with self._cond:
            if self._cancelled:
                return
            self._pending.extend(data)
            self.bytes_written += len(data)
            self._cond.notify_all()
