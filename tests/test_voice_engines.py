"""Both text-to-speech engines, tiny and random, loaded through voice/'s own loading code."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.config.schema import VoiceSection
from voice.speak.clips import CLIP_RATE, load_clip
from voice.speak.factory import load_tts
from voice.speak.tts import VoiceUnavailable
from voice_tiny import spoken_clip, tiny_pocket_config, tiny_xtts_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> np.ndarray:
    return load_clip(spoken_clip(tmp_path_factory.mktemp("clips") / "ref.wav")).samples


def section(engine: str, model: str) -> VoiceSection:
    return VoiceSection(engine=engine, model=model, device="auto")


def speech(engine, state, text: str, seed: int = 0) -> np.ndarray:
    torch.manual_seed(seed)
    return np.concatenate(list(engine.synthesize(state, text, threading.Event())))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["pocket", "xtts"])
def test_engine_clones_streams_and_restores_a_saved_state(kind, clip, tmp_path):
    model = str(tiny_pocket_config() if kind == "pocket" else tiny_xtts_dir())
    engine = load_tts(section(kind, model))
    assert engine.name == kind and engine.sample_rate == 24_000 and engine.device == "cpu"
    assert model in engine.model_id

    state = engine.clone([clip, clip[: CLIP_RATE * 4]], CLIP_RATE)
    chunks = list(engine.synthesize(state, "Hello there, how are you today?", threading.Event()))
    audio = np.concatenate(chunks)
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    assert np.isfinite(audio).all() and 0.3 < len(audio) / engine.sample_rate < 10
    assert np.abs(audio).max() > 1e-3  # not silence

    engine.save_state(state, tmp_path / "voice.safetensors")
    restored = engine.load_state(tmp_path / "voice.safetensors")
    assert np.allclose(speech(engine, state, "Same words."), speech(engine, restored, "Same words."), atol=1e-5)

    stop = threading.Event()
    stop.set()
    assert sum(len(c) for c in engine.synthesize(state, "Never said.", stop)) == 0


@pytest.mark.timeout(60)
def test_pocket_refuses_weights_without_voice_cloning(tmp_path):
    config = yaml.safe_load(tiny_pocket_config().read_text())
    # The cloning weights cannot be fetched (gated, offline): pocket-tts falls back to the others.
    config["weights_path_without_voice_cloning"] = config["weights_path"]
    config["weights_path"] = "hf://kyutai/pocket-tts-gated-test/model.safetensors"
    (tmp_path / "no-cloning.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(VoiceUnavailable, match="without voice cloning.*HF_TOKEN.*offline.*voice.engine: piper"):
        load_tts(section("pocket", str(tmp_path / "no-cloning.yaml")))


@pytest.mark.timeout(60)
def test_engine_problems_are_explained(tmp_path, monkeypatch):
    with pytest.raises(VoiceUnavailable, match="no variant 'klingon'.*english_18m_2026-10"):
        load_tts(section("pocket", "klingon"))
    with pytest.raises(VoiceUnavailable, match="no pocket-tts config at"):
        load_tts(section("pocket", str(tmp_path / "missing.yaml")))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(VoiceUnavailable, match="lacks model.pth, vocab.json"):
        load_tts(section("xtts", str(tmp_path / "ckpt")))
    monkeypatch.delenv("COQUI_TOS_AGREED", raising=False)
    with pytest.raises(VoiceUnavailable, match="non-commercial Coqui Public Model License.*COQUI_TOS_AGREED=1"):
        load_tts(section("xtts", "tts_models/multilingual/multi-dataset/xtts_v2"))
    with pytest.raises(VoiceUnavailable, match="no CUDA device"):
        load_tts(VoiceSection(engine="pocket", model=str(tiny_pocket_config()), device="cuda"))


@pytest.mark.timeout(60)
def test_loading_pocket_keeps_the_chat_models_threads():
    """pocket-tts calls torch.set_num_threads(1) on import; the chat model must keep its threads."""
    code = (
        "import torch; torch.set_num_threads(3)\n"
        "from core.config.schema import VoiceSection\n"
        "from voice.speak.factory import load_tts\n"
        f"load_tts(VoiceSection(model={str(tiny_pocket_config())!r}))\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "3"


@pytest.mark.timeout(120)
def test_xtts_decodes_each_window_once_into_the_samples_of_a_whole_decode(clip):
    """The streaming decoder hands out a short first chunk, then longer ones, as the latents come,
    and together they are the audio of one decode of all of them: no seams, no cross-fades."""
    from voice.speak.xtts_decode import FIRST_CHUNK_S, WindowedDecoder

    engine = load_tts(section("xtts", str(tiny_xtts_dir())))
    decoder, args = engine.model.hifigan_decoder, engine.model.args
    generator = torch.Generator().manual_seed(0)
    latents = list(torch.randn(40, args.decoder_input_dim, generator=generator))
    embedding = torch.randn(1, args.d_vector_dim, 1, generator=generator)
    with torch.inference_mode():
        whole = decoder(torch.stack(latents)[None], g=embedding).reshape(-1)
        windowed = WindowedDecoder(decoder, embedding)
        chunks = [(n, chunk) for n in range(1, len(latents) + 1)
                  if (chunk := windowed.chunk(latents[:n])) is not None]
        chunks.append((len(latents), windowed.chunk(latents, final=True)))
    audio = torch.cat([chunk for _, chunk in chunks])
    assert audio.shape == whole.shape and torch.allclose(audio, whole, atol=1e-5)
    sizes = [len(chunk) for _, chunk in chunks]
    first_at = chunks[0][0]
    assert first_at < len(latents) // 3  # the first audio long before the sentence's last latent
    latent_s = 1024 / 22_050  # the audio of one GPT latent
    assert FIRST_CHUNK_S <= sizes[0] / engine.sample_rate < FIRST_CHUNK_S + latent_s
    assert len(sizes) >= 4 and sizes[1:-1] == sorted(sizes[1:-1]) and sizes[1] > sizes[0]

    state = engine.clone([clip], CLIP_RATE)
    with pytest.raises(ValueError, match="fewer than 100 text tokens at once"):
        list(engine.synthesize(state, "word " * 200, threading.Event()))  # what XTTS cannot say in one go
