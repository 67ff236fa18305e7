"""XTTS's HiFi-GAN decoder run over a growing stream of GPT latents, one window at a time.

coqui-tts's `Xtts.inference_stream` decodes every latent of the sentence so far at each chunk and
cross-fades the overlap: a sentence of n chunks pays for ~n/2 full decodes, and the seams are
blends of two decodes. The decoder is a stack of convolutions whose reach is finite (about 9
frames of its input on each side), so a window that carries that much context on both sides gives
exactly the samples a decode of the whole sentence gives there. `WindowedDecoder` decodes only
the new part plus that context: linear cost, exact seams, and the chunk size becomes a free
choice: a short first chunk (early audio) and longer ones after it (less context overhead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Decoder input frames on each side of a window whose audio depends on it (measured: a change in
# one frame moves the output from 8.5 frames before it to 9.2 frames after it); one frame spare.
CONTEXT_FRAMES = 10
# The first chunk is short so that a sentence starts soon; each later one is GROWTH times longer,
# up to MAX_CHUNK_S, so that the context decoded twice is a shrinking share of the work.
FIRST_CHUNK_S = 0.2
GROWTH = 1.5
MAX_CHUNK_S = 1.2


class WindowedDecoder:
    """Decodes one sentence's latents as they come; `chunk()` returns new audio or None."""

    def __init__(self, hifigan_decoder, speaker_embedding: torch.Tensor):
        self.decoder = hifigan_decoder
        self.embedding = speaker_embedding
        self.hop = int(hifigan_decoder.output_hop_length)  # samples per decoder frame
        rate = int(hifigan_decoder.output_sample_rate)
        self._frame_s = self.hop / rate
        self._emitted = 0  # decoder frames whose audio was handed out
        self._target = self._frames(FIRST_CHUNK_S)

    def chunk(self, latents: list[torch.Tensor], final: bool = False) -> torch.Tensor | None:
        """Audio for the frames that `latents` (all of the sentence's so far) settle, once a chunk's worth
        is settled (or everything left when `final`); None when it is too early for the next chunk."""
        if not latents:
            return None
        frames = self._frames_of(torch.stack(latents)[None])
        if final:
            end = frames.shape[-1]
        else:
            # Frames interpolated from the last latent change when the next one comes; and a window
            # needs CONTEXT_FRAMES of settled frames after the audio it hands out.
            settled = self._frames_of(torch.stack(latents[:-1])[None]).shape[-1] if len(latents) > 1 else 0
            end = settled - CONTEXT_FRAMES
            if end - self._emitted < self._target:
                return None
        start = max(0, self._emitted - CONTEXT_FRAMES)
        stop = frames.shape[-1] if final else end + CONTEXT_FRAMES
        audio = self.decoder.waveform_decoder(frames[:, :, start:stop], g=self.embedding).reshape(-1)
        audio = audio[(self._emitted - start) * self.hop: (end - start) * self.hop]
        self._emitted = end
        self._target = min(int(self._target * GROWTH), self._frames(MAX_CHUNK_S))
        return audio

    def _frames(self, seconds: float) -> int:
        return max(1, round(seconds / self._frame_s))

    def _frames_of(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder's input frames [1, C, T'] for latents [1, T, C], interpolated as HifiDecoder.forward does."""
        d = self.decoder
        z = F.interpolate(latents.transpose(1, 2), scale_factor=[d.ar_mel_length_compression / d.output_hop_length],
                          mode="linear")
        if d.output_sample_rate != d.input_sample_rate:
            z = F.interpolate(z, scale_factor=[d.output_sample_rate / d.input_sample_rate], mode="linear")
        return z
