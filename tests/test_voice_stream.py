"""The speaking path without a platform: PCM framing, sentence streaming into a real tiny engine,
the shared worker and its bounded queue, failures that end audio but never raise."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
import soxr

from core.config.schema import VoiceSection
from core.metrics import Metrics
from core.replies import ReplyUpdate
from voice.speak.pcm import PcmStream
from voice.speak.speech import Speech
from voice.speak.worker import VoiceBusy
from voice_tiny import tiny_pocket_config, voices_dir_with

FRAME = 3840  # 20 ms of 48 kHz stereo s16le


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> Path:
    """A voices_dir with `alice` registered (and her pocket state computed)."""
    return voices_dir_with(tmp_path_factory.mktemp("voices"), "alice")


def section(voices: Path, **changes) -> VoiceSection:
    return VoiceSection(model=str(tiny_pocket_config()), voices_dir=voices, **changes)


def pcm_of(frames: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(frames), dtype="<i2").reshape(-1, 2)


def drain(output: PcmStream) -> list[bytes]:
    frames = []
    while piece := output.read(timeout=5):
        frames.append(piece)
    return frames


def test_pcm_frames_are_48k_stereo_20ms_and_click_free():
    rate = 24_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate * 2) / rate)).astype(np.float32)
    output = PcmStream(rate)
    rng = np.random.default_rng(0)
    start = 0
    while start < len(tone):  # chunks of any size, as engines hand them out
        size = int(rng.integers(1, 3000))
        output.write(tone[start:start + size])
        start += size
    output.finish()
    frames = drain(output)
    assert output.read(timeout=0) == b""
    assert {len(f) for f in frames} == {FRAME}
    pcm = pcm_of(frames)
    assert (pcm[:, 0] == pcm[:, 1]).all()  # the same voice on both channels
    whole = soxr.resample(tone, rate, 48_000)
    left = pcm[:, 0].astype(np.float64) / 32767
    assert len(left) == -(-len(whole) // 960) * 960  # padded to whole frames only
    assert np.abs(left[: len(whole)] - whole).max() < 2e-4  # as if resampled in one go
    step = 2 * np.pi * 440 / 48_000 * 0.5  # the largest sample-to-sample change of this tone
    assert np.abs(np.diff(left[100: len(whole) - 100])).max() < step * 1.05  # no jumps at chunk boundaries


def test_pcm_stream_reports_underruns_ends_and_cancels():
    output = PcmStream(48_000)
    assert output.read(timeout=0.01) is None  # nothing yet: an underrun, not the end
    output.write(np.zeros(960 * 3 // 2, dtype=np.float32))
    assert len(output.read(timeout=0)) == FRAME and output.read(timeout=0) is None
    output.finish()
    assert len(output.read(timeout=0)) == FRAME and output.read(timeout=0) == b""  # padded last frame
    mono = PcmStream(24_000, rate=24_000, channels=1, frame_ms=None)
    mono.write(np.ones(100, dtype=np.float32))
    assert len(mono.read(timeout=0)) == 200
    mono.write(np.ones(100, dtype=np.float32))
    mono.cancel()
    assert mono.read(timeout=0) == b""


def test_held_audio_waits_until_it_is_released():
    """A sentence held back (it could not be played without a gap yet) is not read; what came before is."""
    output = PcmStream(48_000)
    output.write(np.zeros(960, dtype=np.float32))  # one frame of the sentence playing
    output.hold()
    output.write(np.ones(960 * 2, dtype=np.float32))  # the next sentence, held
    assert len(output.read(timeout=0)) == FRAME and output.read(timeout=0) is None and output.starved()
    assert output.buffered_seconds() == pytest.approx(0.04)  # held audio still counts as buffered
    output.release()
    frames = [output.read(timeout=0), output.read(timeout=0)]
    assert all(len(f) == FRAME and f != bytes(FRAME) for f in frames) and output.read(timeout=0) is None
    output.hold()
    output.write(np.ones(960, dtype=np.float32))
    output.finish()  # the end hands out whatever was held
    assert len(output.read(timeout=0)) == FRAME and output.read(timeout=0) == b""


@pytest.mark.timeout(60)
async def test_reply_speaks_each_sentence_while_the_rest_is_written(voices, caplog):
    caplog.set_level(logging.INFO, logger="voice")
    metrics = Metrics()
    speech = Speech(section(voices), metrics)
    await speech.start()
    try:
        reply = speech.reply("alice", adapter="test", label="r1")
        await reply.on_update(ReplyUpdate("Hello"))
        await reply.on_update(ReplyUpdate("Hello there, friend. How are"))
        # The first sentence is spoken while the model still writes the second.
        await asyncio.wait_for(reply.ready.wait(), 30)
        assert reply.output.bytes_written > 0 and not reply.synthesized.is_set()
        first = reply.output.read(timeout=0)
        assert len(first) == FRAME
        await reply.on_update(ReplyUpdate("Hello there, friend. How are you today? Fine", final=False))
        await reply.on_update(ReplyUpdate("Hello there, friend. How are you today? Fine.", final=True))
        await asyncio.wait_for(reply.synthesized.wait(), 30)
        frames = [first] + drain(reply.output)
        reply.finish("spoken")
    finally:
        await speech.close()
    assert reply.sentences == 3 and reply.error is None
    pcm = pcm_of(frames)
    assert np.abs(pcm).max() > 100  # audible
    seconds = len(frames) * 0.02
    assert seconds == pytest.approx(reply.output.seconds_written) and seconds > 3 * 0.5
    sample = metrics.registry.get_sample_value
    assert sample("ttt_voice_replies_total", {"adapter": "test", "outcome": "spoken"}) == 1
    assert sample("ttt_voice_audio_seconds_total", {"adapter": "test"}) == pytest.approx(seconds)
    assert sample("ttt_voice_synthesis_seconds_count", {"engine": "pocket"}) == 3
    assert sample("ttt_voice_real_time_factor_count", {"engine": "pocket"}) == 3
    assert sample("ttt_voice_time_to_first_audio_seconds_count", {"adapter": "test"}) == 1
    assert sample("ttt_voice_queue_depth") == 0
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("voice: reply r1")]
    assert "voice=alice outcome=spoken sentences=3" in line and f"frames={len(frames)}" in line


@pytest.mark.timeout(60)
async def test_a_rewritten_draft_is_spoken_anew_and_failures_end_the_audio_quietly(voices):
    speech = Speech(section(voices), Metrics())
    await speech.start()
    try:
        reply = speech.reply("alice", adapter="test", label="draft")
        await reply.on_update(ReplyUpdate("Hello there. Bad wor"))
        await reply.on_update(ReplyUpdate("Let's talk about something else.", final=True))
        await asyncio.wait_for(reply.synthesized.wait(), 30)
        reply.finish("spoken")
        assert reply.sentences == 2 and reply.error is None

        missing = speech.reply("nobody", adapter="test", label="missing")
        await missing.on_update(ReplyUpdate("Not said. At all.", final=True))  # never raises
        await asyncio.wait_for(missing.synthesized.wait(), 30)
        assert drain(missing.output) == [] and "no voice called 'nobody'" in str(missing.error)
        missing.finish("spoken")

        failed = speech.reply("alice", adapter="test", label="failed")
        await failed.on_update(ReplyUpdate("Half of a reply. And"))
        failed.abandon_unfinished()  # the text reply failed before its final update
        await asyncio.wait_for(failed.synthesized.wait(), 30)
        assert failed.output.read(timeout=0) == b""
        failed.finish("failed")
    finally:
        await speech.close()
    sample = speech.metrics.registry.get_sample_value
    assert sample("ttt_voice_replies_total", {"adapter": "test", "outcome": "failed"}) == 2


@pytest.mark.timeout(60)
async def test_one_engine_per_process_and_a_bounded_queue(voices):
    first, second = Speech(section(voices, max_queue=2), Metrics()), Speech(section(voices, max_queue=2), Metrics())
    await asyncio.gather(first.start(), second.start())
    try:
        assert first.worker is second.worker  # one loaded model, shared
        one = first.reply("alice", adapter="test", label="1")
        two = second.reply("alice", adapter="test", label="2")
        with pytest.raises(VoiceBusy):
            first.reply("alice", adapter="test", label="3")
        assert first.metrics.registry.get_sample_value("ttt_voice_queue_depth") == 1
        assert second.metrics.registry.get_sample_value("ttt_voice_queue_depth") == 2
        one.finish("skipped")
        first.reply("alice", adapter="test", label="4").finish("skipped")
        two.finish("skipped")
    finally:
        await first.close()
        worker = second.worker
        await second.close()
    assert not worker._thread.is_alive()  # the last user unloaded it
