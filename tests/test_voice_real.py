"""The real speech models, piece by piece: the bundled Piper voice heard back by the bundled Whisper
tiny.en, Piper's phonemes from espeak-ng, Smart Turn's features and its judgement of pauses in turn
taking, and what counts as a backchannel."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from core.config.schema import ListenSection, VoiceSection
from voice.listen.barge_in import backchannel, takes_the_turn
from voice.listen.smart_turn import features
from voice.listen.turns import TurnTaker
from voice.speak.factory import load_tts
from voice.speak.phonemes import clauses, espeak_ipa, phoneme_ids, phonemize
from voice.speak.piper_engine import CANNOT_CLONE
from voice.speak.registry import VoiceRegistry, VoiceStates
from voice.speak.tts import VoiceUnavailable
from voice_real import espeak_says, hear, piper_says, silence, stereo48, wer

SAID = "Dragons are large and strong. They can fly over the mountains."
PAUSED = ("I was thinking about going to the park,", "and then having lunch there.")
QUESTION = "What is the capital of France?"
ASKED = "Tell me a short story about a dragon."


@pytest.mark.timeout(120)
def test_the_bundled_piper_voice_speaks_offline_and_whisper_tiny_en_hears_it(real_voice, real_ear, tmp_path):
    engine = real_voice
    assert (engine.name, engine.sample_rate, engine.device, engine.clones) == ("piper", 22_050, "cpu", False)
    assert "en_US-joe-medium.onnx" in engine.model_id
    chunks = list(engine.synthesize(engine.default_state(), SAID, threading.Event()))
    assert len(chunks) == 2 and all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)  # one per sentence
    audio = np.concatenate(chunks)
    assert 2.5 < len(audio) / engine.sample_rate < 8 and np.abs(audio).max() == pytest.approx(1.0)
    heard = hear(real_ear, piper_says(engine, SAID))
    assert wer(SAID, heard) <= 0.2, heard

    stop = threading.Event()
    stop.set()
    assert list(engine.synthesize(engine.default_state(), "Never said.", stop)) == []
    # It cannot clone: a persona's registered voice is spoken in Piper's own voice.
    with pytest.raises(VoiceUnavailable, match="cannot be cloned"):
        engine.clone([audio], engine.sample_rate)
    assert VoiceStates(VoiceRegistry(tmp_path)).get("ada", engine) == engine.default_state()


@pytest.mark.timeout(60)
def test_piper_problems_are_explained(tmp_path, monkeypatch):
    with pytest.raises(VoiceUnavailable, match="'voice.yaml' is not a Piper voice: give the path of its .onnx"):
        load_tts(VoiceSection(engine="piper", model="voice.yaml"))
    (tmp_path / "lone.onnx").write_bytes(b"onnx")
    with pytest.raises(VoiceUnavailable, match="has no lone.onnx.json beside it"):
        load_tts(VoiceSection(engine="piper", model=str(tmp_path / "lone.onnx")))
    (tmp_path / "lone.onnx.json").write_text("{}")
    with pytest.raises(VoiceUnavailable, match="could not load the Piper voice .*lone.onnx"):
        load_tts(VoiceSection(engine="piper", model=str(tmp_path / "lone.onnx")))
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng program
    with pytest.raises(VoiceUnavailable, match="needs the espeak-ng program.*apt-get install espeak-ng"):
        load_tts(VoiceSection(engine="piper"))
    assert "voice.engine is piper" in CANNOT_CLONE and "pocket and xtts" in CANNOT_CLONE


def test_clauses_end_where_espeak_ng_ends_them():
    texts = ["Hi, Mr. Smith! Is it 3.5 km... or more?", "Wait?! No: e.g. this; that.\n\nNew paragraph",
             "I met Dr. Jones. He said hi.", "Email me at a.b@c.com, please.", "U.S.A.'s flag. Fine", "... , !"]
    for text in texts:  # espeak-ng prints one line per clause
        assert len(clauses(text)) == len(espeak_ipa(text, "en-us")), text
    assert [(c.text.strip(), c.terminator, c.ends_sentence) for c in clauses(texts[0])] == [
        ("Hi,", ",", False), ("Mr.", ".", True), ("Smith!", "!", True), ("Is it 3.5 km...", "", False),
        ("or more?", "?", True)]
    assert [(c.terminator, c.ends_sentence) for c in clauses(texts[1])] == [
        ("?", True), (":", False), (";", False), ("", True), ("", True)]  # a blank line: no terminator


def test_phonemes_come_from_espeak_ng_by_sentence_with_their_punctuation(real_voice):
    sentences = phonemize("Hello there, friend. How are you?", real_voice.espeak_voice)
    assert len(sentences) == 2
    first, second = ("".join(s) for s in sentences)
    assert first.endswith(". ") is False and "," in first and first.endswith(".") and second.endswith("?")
    ids = phoneme_ids(sentences[1], real_voice.config["phoneme_id_map"])
    id_map = real_voice.config["phoneme_id_map"]
    assert ids[:2] == id_map["^"] + id_map["_"] and ids[-1:] == id_map["$"] and ids[-2:-1] == id_map["_"]
    assert ids[2::2][:-1] == [id_map[p][0] for p in sentences[1] if p in id_map]


def test_smart_turns_features_are_whispers_over_the_last_8_seconds():
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(9 * 16_000)).astype(np.float32)
    audio[:16_000] += np.sin(np.arange(16_000) * 0.05).astype(np.float32)
    reference = WhisperFeatureExtractor(chunk_length=8)(
        audio[-8 * 16_000:], sampling_rate=16_000, padding="max_length", max_length=8 * 16_000, truncation=True,
        do_normalize=True, return_tensors="np").input_features[0]
    assert features(audio).shape == (80, 800)
    assert np.abs(features(audio) - reference).max() < 1e-4
    short = audio[:16_000]  # shorter than 8 s: zero-padded at the start, as pipecat does
    assert np.abs(features(short) - features(np.concatenate([np.zeros(7 * 16_000, np.float32), short]))).max() == 0


def frames(audio: np.ndarray) -> list[bytes]:
    pcm = stereo48(audio)
    return [pcm[i:i + 3840] for i in range(0, len(pcm) - 3839, 3840)]


def turns_of(audio: np.ndarray, turn_model, *, absent: tuple[float, float] = (0.0, 0.0), told: bool = True) -> list:
    """The turns a TurnTaker finds in `audio` arriving in real time (a simulated clock, ticked every 40 ms),
    except that no frame arrives from `absent[0]` to `absent[1]` s: the client stops sending in a silence
    and says so (`told`), or its audio is late."""
    ended = []
    listener = TurnTaker(ListenSection(enabled=True), on_turns=ended.extend, turn_model=turn_model)
    now = 0.0
    for frame in frames(np.concatenate([audio, silence(1.5)])):
        if absent[0] <= now < absent[1]:
            if told and now - 0.02 < absent[0]:
                listener.stopped_sending("alice")
        else:
            listener.hear("alice", frame, now=now)
        now += 0.02
        if round(now * 1000) % 40 == 0:
            listener.tick(now=now)
    return ended


@pytest.mark.timeout(120)
def test_a_pause_mid_sentence_does_not_end_the_turn_but_a_complete_question_ends_it_at_once(real_voice, smart_turn):
    first, second = (piper_says(real_voice, part, lively=False) for part in PAUSED)
    paused = np.concatenate([silence(0.5), first, silence(0.6), second])
    [turn] = turns_of(paused, smart_turn)
    assert turn.ended_by == "silence" and turn.speech_s > 3  # one turn: both halves
    pause_starts = 0.5 + len(first) / 16_000 + 0.04  # the same pause, where the client stops sending
    [turn] = turns_of(paused, smart_turn, absent=(pause_starts, pause_starts + 0.5))
    assert turn.speech_s > 3

    question = np.concatenate([silence(0.5), piper_says(real_voice, QUESTION, lively=False)])
    [turn] = turns_of(question, smart_turn)
    assert turn.ended_by == "smart-turn" and turn.ended_at - turn.last_speech_at < 0.35
    [turn] = turns_of(question, None)  # turn_model: silence
    assert turn.ended_by == "silence" and turn.ended_at - turn.last_speech_at >= 0.8
    question = np.concatenate([silence(0.5), espeak_says(QUESTION)])
    [turn] = turns_of(question, smart_turn, absent=(len(question) / 16_000, 99))
    assert turn.ended_by == "smart-turn"  # judged on audio that stopped coming, too
    late = (0.5 + len(espeak_says("Tell me a short")) / 16_000, 0.5 + len(espeak_says("Tell me a short story")) / 16_000)
    [turn] = turns_of(np.concatenate([silence(0.5), espeak_says(ASKED)]), smart_turn, absent=late, told=False)
    assert turn.ended_by == "smart-turn" and turn.speech_s > 1.5  # late audio mid-sentence is not a pause


def test_backchannels_are_not_turns_and_two_real_words_take_the_turn():
    for said in ("Mhm.", "Mm-hmm.", "Uh-huh.", "Uh huh", "Yeah.", "Yeah, right.", "Okay.", "OK!", "Right."):
        assert backchannel(said) and not takes_the_turn(said), said
    for said in ("Yeah, but why?", "Stop talking.", "Okay, tell me more."):
        assert not backchannel(said) and takes_the_turn(said), said
    assert not backchannel("Why?") and not takes_the_turn("Why?") and not backchannel("")
