"""`ttt voice add|list|remove` and `ttt say` through the real `ttt` entry point, with both tiny engines."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml

from core.config.loading import ConfigError, load_settings
from core.config.schema import ListenSection, VoiceSection
from core.metrics import Metrics
from ttt.cli import main
from voice_tiny import spoken_clip, tiny_pocket_config, tiny_xtts_dir

CONSENT = "Alice Example recorded these clips herself on 2026-05-01 and agreed to their use by this bot."


def ttt(config: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--config", str(config), "--log-level", "WARNING", *args])
    return code, out.getvalue(), err.getvalue()


def write_config(root: Path, engine: str = "pocket", model: Path | str | None = None, **voice) -> Path:
    if model is None and engine != "piper":  # piper: its bundled voice
        model = tiny_pocket_config() if engine == "pocket" else tiny_xtts_dir()
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"default_persona": "talker"},
        "personas": {
            "talker": {"model": "unused", "voice": "alice"},
            "quiet": {"model": "unused"},
        },
        "voice": {"engine": engine, "model": None if model is None else str(model), "voices_dir": "voices", **voice},
    }))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Good clips (22 kHz mono WAV, 44.1 kHz stereo FLAC) and bad ones."""
    root = tmp_path_factory.mktemp("clips")
    good = spoken_clip(root / "alice.wav")
    stereo = spoken_clip(root / "alice-2.flac", "Another sentence, read slowly and clearly, for the cloning.",
                         stereo=True)
    soundfile.write(str(root / "short.wav"), np.sin(np.arange(22_050) / 10).astype(np.float32) * 0.5, 22_050)
    soundfile.write(str(root / "silent.wav"), np.zeros(5 * 16_000, dtype=np.float32), 16_000)
    soundfile.write(str(root / "long.wav"), np.sin(np.arange(31 * 8000) / 5).astype(np.float32) * 0.5, 8000)
    (root / "notes.wav").write_text("these are not audio samples\n" * 20)
    locked = root / "locked.wav"
    locked.write_bytes(good.read_bytes())
    locked.chmod(0)
    (root / "copy").mkdir()
    shutil.copy(good, root / "copy" / good.name)
    return {"good": good, "stereo": stereo, "short": root / "short.wav", "silent": root / "silent.wav",
            "long": root / "long.wav", "text": root / "notes.wav", "locked": locked, "missing": root / "none.wav",
            "folder": root, "copy": root / "copy" / good.name}


def states(voice_dir: Path) -> list[str]:
    return sorted(p.name for p in (voice_dir / "states").iterdir())


@pytest.mark.timeout(120)
def test_voice_add_list_remove_with_manifest_and_state_cache(tmp_path, clips, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path)
    good, stereo = str(clips["good"]), str(clips["stereo"])
    code, out, err = ttt(config, "voice", "add", "alice", good, stereo, "--consent", CONSENT)
    assert code == 0, err
    assert "registered voice alice: 2 clip(s)" in out and "pocket voice state computed" in out

    voice_dir = tmp_path / "voices" / "alice"  # relative to the working directory
    manifest = json.loads((voice_dir / "manifest.json").read_text())
    assert manifest["name"] == "alice" and manifest["consent"] == CONSENT
    assert manifest["created"].startswith("20") and manifest["created"].endswith("+00:00")
    first, second = manifest["clips"]
    assert (first["source"], first["source_rate"], first["source_channels"]) == ("alice.wav", 22_050, 1)
    assert (second["source"], second["source_rate"], second["source_channels"]) == ("alice-2.flac", 44_100, 2)
    for record in manifest["clips"]:
        data, rate = soundfile.read(str(voice_dir / record["file"]))
        assert rate == 24_000 and data.ndim == 1 and abs(np.abs(data).max() - 0.89) < 0.01  # normalised
        assert 3 <= record["seconds"] <= 30 and len(record["sha256"]) == len(record["source_sha256"]) == 64
    [pocket_state] = states(voice_dir)
    assert pocket_state.startswith("pocket-") and pocket_state.endswith(".safetensors")

    code, out, _ = ttt(config, "voice", "list")
    assert code == 0 and out.startswith("alice") and "2 clip(s)" in out and "personas: talker" in out and CONSENT in out
    # What a killed `ttt voice add` leaves (its staging folder) is no voice; a damaged manifest is shown as such.
    staging = tmp_path / "voices" / ".adding-bob-x1y2"
    staging.mkdir()
    (staging / "manifest.json").write_text((voice_dir / "manifest.json").read_text())
    (tmp_path / "voices" / "carol").mkdir()
    (tmp_path / "voices" / "carol" / "manifest.json").write_text("{")
    code, out, _ = ttt(config, "voice", "list")
    assert code == 0 and ".adding" not in out and "carol            DAMAGED: voice 'carol'" in out
    shutil.rmtree(staging)
    assert ttt(config, "voice", "remove", "carol")[0] == 0

    # Same engine, model and clips: the cached state is reused (`ttt say` loads, never recomputes).
    code, out, err = ttt(config, "say", "Hello there. How are you?", "--persona", "talker",
                         "-o", str(tmp_path / "a.wav"))
    assert code == 0, err
    assert states(voice_dir) == [pocket_state]
    audio, rate = soundfile.read(str(tmp_path / "a.wav"))
    assert rate == 24_000 and np.isfinite(audio).all() and np.abs(audio).max() > 1e-3
    assert f"wrote {len(audio) / rate:.1f} s of speech in alice" in out
    assert len(audio) / rate > 1.0  # two sentences, each synthesized on its own
    # Another engine gets its own state; so does a changed clip.
    (tmp_path / "x").mkdir()
    xtts_config = write_config(tmp_path / "x", "xtts")
    assert ttt(xtts_config, "say", "Hello.", "--voice", "alice", "-o", str(tmp_path / "b.wav"))[0] == 0
    assert len(states(voice_dir)) == 2 and any(s.startswith("xtts-") for s in states(voice_dir))
    clip = voice_dir / first["file"]
    data, rate = soundfile.read(str(clip))
    soundfile.write(str(clip), data * 0.5, rate, subtype="PCM_16")
    config = write_config(tmp_path)
    assert ttt(config, "say", "Hello.", "--voice", "alice", "-o", str(tmp_path / "c.wav"))[0] == 0
    pockets = [s for s in states(voice_dir) if s.startswith("pocket-")]
    assert len(pockets) == 2 and pocket_state in pockets
    # Where no WAV can be written, or nothing would be said: one line saying so, no file.
    (tmp_path / "taken").write_text("a file, not a folder")
    code, _, err = ttt(config, "say", "Hello.", "--voice", "alice", "-o", str(tmp_path / "taken" / "d.wav"))
    assert code == 2 and err == f"ttt: cannot write {tmp_path / 'taken' / 'd.wav'}: Not a directory\n"
    code, _, err = ttt(config, "say", "Hello.", "--voice", "alice", "-o", str(tmp_path / "d.mp3"))
    assert code == 2 and "give a name that ends in .wav" in err
    code, _, err = ttt(config, "say", "\N{GRINNING FACE} :)", "--voice", "alice", "-o", str(tmp_path / "d.wav"))
    assert code == 2 and "nothing to say" in err
    assert not list(tmp_path.glob("d.*"))

    # Registering the same name again changes nothing.
    code, _, err = ttt(config, "voice", "add", "alice", str(clips["good"]), "--consent", CONSENT)
    assert code == 2 and "already registered" in err
    code, out, _ = ttt(config, "voice", "remove", "alice")
    assert code == 0 and "removed voice alice" in out and "talker still name it" in out
    assert not voice_dir.exists() and list((tmp_path / "voices").iterdir()) == []
    code, _, err = ttt(config, "voice", "remove", "alice")
    assert code == 2 and "no voice called 'alice'" in err
    assert "no voices registered" in ttt(config, "voice", "list")[1]


@pytest.mark.timeout(60)
def test_voice_add_rejects_bad_clips_and_stores_nothing(tmp_path, clips):
    # Clips are checked before the engine loads (a real one may download first): this one cannot load.
    config = write_config(tmp_path, model=tmp_path / "no-such-model.yaml")
    code, _, err = ttt(config, "voice", "add", "bob", *(str(clips[k]) for k in
                       ("good", "short", "silent", "long", "text", "locked", "missing", "folder")), str(clips["copy"]), "--consent",
               CONSENT)
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == "ttt: cannot register 'bob':"
    problems = dict(line.strip().split(": ", 1) for line in lines[1:])
    assert problems[str(clips["short"])] == "1.0 s long; a reference clip must last 3 to 30 s"
    assert problems[str(clips["long"])] == "31.0 s long; a reference clip must last 3 to 30 s"
    assert problems[str(clips["silent"])].startswith("silent")
    assert problems[str(clips["text"])].startswith("not readable as audio")
    if os.geteuid() != 0:  # root reads anything
        assert problems[str(clips["locked"])] == "cannot be read (permission denied)"
    assert problems[str(clips["missing"])] == "no such file"
    assert problems[str(clips["folder"])] == "a folder, not an audio file"
    assert problems[str(clips["copy"])] == f"the same recording as {clips['good']}"
    assert str(clips["good"]) not in problems
    assert not (tmp_path / "voices").exists() or list((tmp_path / "voices").iterdir()) == []

    for args, message in [
        (["bad name!", str(clips["good"])], "use 1-64 letters"),
        (["bob", str(clips["good"]), "--consent", "   "], None),
    ]:
        code, _, err = ttt(config, "voice", "add", *args, *([] if "--consent" in args else ["--consent", CONSENT]))
        assert code == 2 and (message or "--consent is required") in err
    assert not (tmp_path / "voices").exists() or list((tmp_path / "voices").iterdir()) == []


@pytest.mark.timeout(60)
def test_say_explains_what_it_cannot_do(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "out.wav"
    code, _, err = ttt(config, "say", "Hi.", "--voice", "nobody", "-o", str(out))
    assert code == 2 and "no voice called 'nobody' is registered" in err
    code, _, err = ttt(config, "say", "Hi.", "--persona", "ghost", "-o", str(out))
    assert code == 2 and "no persona called 'ghost'" in err
    # The tiny model's default voice is pocket-tts's own clip, which cannot be downloaded here.
    code, _, err = ttt(config, "say", "Hi.", "--persona", "quiet", "-o", str(out))
    assert code == 2 and "default voice" in err and "could not be loaded" in err
    config = write_config(tmp_path, require_registered=True)
    code, _, err = ttt(config, "say", "Hi.", "--persona", "quiet", "-o", str(out))
    assert code == 2 and "no registered voice (voice.require_registered is on)" in err
    assert not out.exists()


def test_check_says_what_voice_would_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, out, _ = ttt(write_config(tmp_path, "xtts", enabled=True), "check")
    assert code == 0
    assert f"voice: xtts engine, {tiny_xtts_dir()}, device auto, language en" in out
    assert "non-commercial use only" in out and "https://coqui.ai/cpml" in out
    assert "persona talker: voice 'alice' is NOT REGISTERED" in out
    assert "persona quiet: the engine's default voice" in out
    code, out, _ = ttt(write_config(tmp_path, "pocket", enabled=True, model="english_18m_2026-10"), "check")
    assert code == 0 and "HF_TOKEN is not set" in out and "licence" not in out
    assert "voice.engine: piper speaks offline" in out
    code, out, _ = ttt(write_config(tmp_path, "pocket"), "check")
    assert "voice: off" in out


def test_piper_speaks_in_its_own_voice_and_registers_none(tmp_path, clips, monkeypatch):
    from voice.speak.piper_engine import bundled_voice

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "piper", enabled=True)
    code, out, _ = ttt(config, "check")
    assert code == 0
    assert f"voice: piper engine, {bundled_voice()} (the default, bundled en_US-joe-medium), on the CPU" in out
    assert "persona talker: piper's own voice (piper cannot clone: voice alice is for pocket and xtts)" in out
    code, out, err = ttt(config, "voice", "add", "alice", str(clips["good"]), "--consent", CONSENT)
    assert code == 2 and out == "" and "voice.engine is piper" in err and "cannot be cloned" in err
    assert not (tmp_path / "voices").exists()  # nothing registered
    code, out, err = ttt(config, "say", "Hello there. How are you today?", "-o", str(tmp_path / "hi.wav"))
    assert code == 0, err
    audio, rate = soundfile.read(str(tmp_path / "hi.wav"))
    assert rate == 22_050 and 1.0 < len(audio) / rate < 5 and np.abs(audio).max() > 0.1  # the voice's own rate
    code, out, _ = ttt(write_config(tmp_path, "piper", model=str(tmp_path / "missing.onnx"), enabled=True), "check")
    assert code == 2 and "CANNOT START: voice.model: " in out and "is not a Piper voice" in out
    (tmp_path / "lone.onnx").write_bytes(b"onnx")  # a voice without its .onnx.json: check says so, as start would
    code, out, _ = ttt(write_config(tmp_path, "piper", model=str(tmp_path / "lone.onnx"), enabled=True), "check")
    assert code == 2 and "CANNOT START: voice.model: the Piper voice" in out and "has no lone.onnx.json" in out


def test_voice_config_names_registered_voices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"service": {"default_persona": "p"},
                                    "personas": {"p": {"model": "m", "voice": "../alice.wav"}}}))
    with pytest.raises(ConfigError, match="personas.p.voice: got '../alice.wav'.*name of a registered voice"):
        load_settings(path, {})
    path.write_text(yaml.safe_dump({"service": {"default_persona": "p"},
                                    "personas": {"p": {"model": "m", "voice": "alice"}},
                                    "voice": {"model": "./tts/config.yaml"}}))
    settings = load_settings(path, {"TTT_VOICE__ENABLED": "true", "TTT_VOICE__IDLE_LEAVE_S": "5"})
    voice = settings.config.voice
    assert voice.enabled and voice.idle_leave_s == 5 and voice.engine == "pocket"
    assert voice.voices_dir == tmp_path / "voices" and voice.model == str(tmp_path / "tts" / "config.yaml")
    assert settings.config.personas["p"].voice == "alice"  # a name, never resolved as a path


def test_readme_documents_every_voice_setting_and_metric_by_its_exposed_name():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("\n## Voice\n"):]
    section = section[:section.index("\n## ", 1)]
    keys = [k for k in VoiceSection.model_fields if k != "listen"] + list(ListenSection.model_fields)
    assert [k for k in keys if f"| `{k}` |" not in section] == []
    names = [f"{m.name}_total" if m.type == "counter" else m.name
             for m in Metrics().registry.collect() if m.name.startswith("ttt_voice_")]
    assert len(names) == 11 and [n for n in names if not re.search(rf"`{n}[`{{]", section)] == []
