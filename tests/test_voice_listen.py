"""Listening, piece by piece: the DAVE shim on frames from davey's own sessions and the extension's
reader, turn taking on real speech, the hallucination filter, batched transcription with the tiny
Whisper (transformers and faster-whisper)."""

from __future__ import annotations

import queue

import davey
import numpy as np
import pytest
import soxr
from discord.ext.voice_recv import rtp
from discord.ext.voice_recv.reader import PacketDecryptor
from discord.opus import Encoder

from bots.discord.voice.receive import OPUS_SILENCE, DaveDecrypt, rtp_payload
from core.config.schema import ListenSection
from fakes.dave import group_of
from fakes.discord_voice_server import SUPPORTED, FakeSpeaker, rtp_packet
from voice.listen.hallucinations import real_words
from voice.listen.transcriber import acquire_transcriber
from voice.listen.turns import TurnTaker
from voice_tiny import PHRASES, spoken_phrase, tiny_faster_whisper_dir, tiny_whisper_dir

CHANNEL, BOT, ALICE, BOB = 4242, 1001, 1002, 1003


class Connection:
    """What the shim reads of discord.py's VoiceConnectionState: its DAVE session and protocol version."""

    def __init__(self, session, version: int = 1):
        self.dave_session, self.dave_protocol_version = session, version


def opus_frame(seed: int = 0) -> bytes:
    noise = np.random.default_rng(seed).integers(-3000, 3000, 960 * 2, dtype=np.int16)
    return Encoder().encode(noise.tobytes(), 960)


@pytest.mark.timeout(30)
def test_the_dave_shim_decrypts_frames_that_davey_encrypted_through_the_extensions_reader():
    _, (bot, alice, bob) = group_of(CHANNEL, BOT, ALICE, BOB)
    decrypt = DaveDecrypt(Connection(bot))
    frame = opus_frame()
    sealed = alice.encrypt_opus(frame)
    assert sealed != frame and sealed[-2:] == b"\xfa\xfa"  # DAVE ciphertext, with its magic marker

    # Through the extension's own reader steps: RTP decoding, then transport decryption (rtpsize AEAD),
    # padding (RFC 3550) included; then the shim.
    key = bytes(range(32))
    speaker = FakeSpeaker(ALICE, ssrc=77, encoder=None)
    for padding in (0, 4):
        packet = rtp.decode_rtp(rtp_packet(key, speaker, alice.encrypt_opus(frame), padding))
        packet.decrypted_data = PacketDecryptor(SUPPORTED, key).decrypt_rtp(packet)
        assert decrypt(ALICE, rtp_payload(packet)) == frame
    assert decrypt(BOB, bob.encrypt_opus(frame)) == frame  # each sender has their own key
    assert decrypt(BOB, sealed) is None  # attributed to the wrong person: not readable
    assert decrypt(ALICE, OPUS_SILENCE) == OPUS_SILENCE  # silence travels unencrypted
    assert decrypt.failures == 1

    # Before the group is formed nothing encrypted can be read; with DAVE off, frames are plain.
    assert DaveDecrypt(Connection(davey.DaveSession(1, BOT, CHANNEL)))(ALICE, sealed) is None
    assert DaveDecrypt(Connection(None, version=0))(ALICE, frame) == frame


def stereo48(audio16: np.ndarray) -> bytes:
    mono = soxr.resample(audio16, 16_000, 48_000)
    pcm = (np.clip(mono, -1, 1) * 32767).astype("<i2")
    return np.repeat(pcm[:, None], 2, axis=1).tobytes()


def voiced(text: str, **voice) -> np.ndarray:
    """espeak-ng saying `text`, without the silence it leaves at the end."""
    audio = spoken_phrase(text, **voice)
    return audio[:np.flatnonzero(np.abs(audio) > 0.01)[-1] + 1]


def frames(pcm: bytes) -> list[bytes]:
    return [pcm[i:i + 3840] for i in range(0, len(pcm) - 3839, 3840)]


def feed(listener: TurnTaker, speaker, pcm: bytes, start: float) -> float:
    """Feed `pcm` as 20 ms frames arriving in real time from `start`; returns the time after the last."""
    for i, frame in enumerate(frames(pcm)):
        listener.hear(speaker, frame, now=start + i * 0.02)
    return start + len(frames(pcm)) * 0.02


@pytest.mark.timeout(60)
def test_turns_end_after_silence_short_noise_is_no_turn_long_ones_are_cut_and_leavers_are_forgotten():
    config = ListenSection(enabled=True, silence_ms=500, min_speech_ms=300, max_turn_s=3)
    ended, speaking = [], []
    listener = TurnTaker(config, on_turns=ended.append, on_speech=speaking.append)
    phrase = stereo48(voiced(PHRASES[0]))
    silence = bytes(3840 * 50)

    # Speech then silence that keeps coming: one turn, ended by the silence in the audio.
    now = feed(listener, "alice", silence[:3840 * 10] + phrase + silence, 0.0)
    [[turn]] = ended
    assert turn.speaker == "alice" and speaking == ["alice"]
    assert 0.8 < turn.speech_s < 1.6 and turn.seconds < 1.4 + 0.25 + 0.3 + 0.1  # speech, pre-roll, kept tail
    assert 0.5 <= turn.ended_at - turn.last_speech_at < 0.7

    # Speech, then nothing arrives (the client stopped sending): the tick ends it.
    now = feed(listener, "bob", phrase, now + 5)
    listener.tick(now + 0.2)
    assert len(ended) == 1
    listener.tick(now + 0.6)
    assert [[t.speaker for t in batch] for batch in ended] == [["alice"], ["bob"]]

    # A click is no turn; neither is what someone said before they left.
    click = np.zeros(4800, dtype=np.float32)
    click[:800] = spoken_phrase(PHRASES[1])[4000:4800]
    now = feed(listener, "carol", stereo48(click), now + 5)
    listener.tick(now + 1)
    now = feed(listener, "dave", phrase, now + 5)
    listener.forget("dave")
    listener.tick(now + 1)
    assert len(ended) == 2 and "dave" not in listener.speakers()

    # Longer than max_turn_s: cut there, and the rest is a turn of its own.
    now = feed(listener, "erin", phrase * 4, now + 5)
    listener.tick(now + 1)
    cut = [t for batch in ended[2:] for t in batch]
    assert cut[0].ended_by == "cut" and 2.9 <= cut[0].seconds <= 3.1 and cut[-1].ended_by != "cut" and len(cut) >= 2

    # Two people who stop together end in one batch.
    ended.clear()
    start = now + 5
    ends = [feed(listener, speaker, phrase, start) for speaker in ("frank", "grace")]
    listener.tick(max(ends) + 0.6)
    assert [sorted(t.speaker for t in batch) for batch in ended] == [["frank", "grace"]]


def test_whispers_hallucinations_and_empty_transcripts_are_not_turns():
    for said in ["", "  ", ".", "...", "?!", "Thank you for watching!", "Thanks for watching.", " you",
                 "Subtitles by the Amara.org community", "Thank you. Thank you. Thank you. Thank you.",
                 "Thanks for watching! Please subscribe.", "Thank you for watching, and see you next time!",
                 " [Music]", "(upbeat music)", "*applause*", "♪ la la la ♪", "[BLANK_AUDIO] Thank you."]:
        assert real_words(said) is None, said
    assert real_words(" Thank you for the help, that was quick. ") == "Thank you for the help, that was quick."
    assert real_words("(laughs) Tell me a joke. [Music]") == "Tell me a joke."
    assert real_words("tell me more") == "tell me more"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", ["transformers", "faster-whisper"])
def test_turns_ending_together_are_transcribed_in_one_batch(engine):
    model = tiny_whisper_dir() if engine == "transformers" else tiny_faster_whisper_dir()
    config = ListenSection(enabled=True, engine=engine, model=str(model), device="auto", silence_ms=400)
    transcriber = acquire_transcriber(config)
    assert transcriber.stt.device == "cpu"  # "auto": CUDA when torch sees it
    results: queue.SimpleQueue = queue.SimpleQueue()
    listener = TurnTaker(config, on_turns=lambda turns: transcriber.submit(
        [(turn, lambda t, e: results.put((t, e))) for turn in turns]))
    try:
        ends = [feed(listener, speaker, stereo48(voiced(text, speed=160, pitch=45)), 0.0)
                for speaker, text in zip(("alice", "bob"), PHRASES)]
        listener.tick(max(ends) + 0.5)
        transcripts = [results.get(timeout=60) for _ in PHRASES]
    finally:
        transcriber.release()
    assert [(t.turn.speaker, t.text, t.batch, e) for t, e in transcripts] == [
        ("alice", PHRASES[0], 2, None), ("bob", PHRASES[1], 2, None)]


def test_listen_settings_defaults_overrides_errors_and_what_check_says(tmp_path):
    import yaml

    from core.config.loading import ConfigError, load_settings
    from voice.check import check_voice
    from voice.listen.stt import bundled_whisper

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"service": {"default_persona": "p"}, "personas": {"p": {"model": "m"}},
                                    "voice": {"enabled": True, "model": "./tts.yaml"}}))
    listen = load_settings(path, {}).config.voice.listen
    assert (listen.enabled, listen.barge_in, listen.echo_text, listen.engine, listen.model, listen.turn_model,
            listen.barge_in_min_ms, listen.silence_ms) == (False, True, True, "faster-whisper", None, None, 400, 800)
    assert "  listening: off (voice.listen.enabled)" in check_voice(load_settings(path, {}).config).lines

    # The defaults work offline: the bundled Whisper tiny.en, turns judged by Smart Turn.
    check = check_voice(load_settings(path, {"TTT_VOICE__LISTEN__ENABLED": "on"}).config)
    [line] = [line for line in check.lines if "listening:" in line]
    assert f"faster-whisper Whisper tiny.en (the default, bundled: {bundled_whisper()})" in line
    assert "Smart Turn v3.2 hears it complete after a pause, or after 800 ms of silence" in line
    assert "barge-in on (after 400 ms of speech or two words)" in line and check.problems == []

    settings = load_settings(path, {"TTT_VOICE__LISTEN__ENABLED": "true", "TTT_VOICE__LISTEN__SILENCE_MS": "600",
                                    "TTT_VOICE__LISTEN__ENGINE": "transformers", "TTT_VOICE__LISTEN__ECHO_TEXT": "false",
                                    "TTT_VOICE__LISTEN__TURN_MODEL": "silence",
                                    "TTT_VOICE__LISTEN__BARGE_IN_MIN_MS": "250"})
    listen = settings.config.voice.listen
    assert (listen.enabled, listen.silence_ms, listen.engine, listen.echo_text, listen.turn_model,
            listen.barge_in_min_ms) == (True, 600, "transformers", False, "silence", 250)
    check = check_voice(settings.config)
    [line] = [line for line in check.lines if "listening:" in line]
    assert "transformers Whisper openai/whisper-base.en (the default; from the Hugging Face Hub" in line
    assert "a turn ends after 600 ms of silence;" in line and "Smart Turn" not in line
    assert "barge-in on (after 250 ms of speech or two words)" in line and "not echoed" in line
    assert check.problems == []
    with pytest.raises(ConfigError, match="voice.listen.engine: got 'whisper.cpp'"):
        load_settings(path, {"TTT_VOICE__LISTEN__ENGINE": "whisper.cpp"})
    with pytest.raises(ConfigError, match="voice.listen.turn_model: got 'vad'"):
        load_settings(path, {"TTT_VOICE__LISTEN__TURN_MODEL": "vad"})
    with pytest.raises(ConfigError, match="voice.listen.barge_in_min_ms: got '-1'; expected: Input should be greater than or equal to 0"):
        load_settings(path, {"TTT_VOICE__LISTEN__BARGE_IN_MIN_MS": "-1"})
