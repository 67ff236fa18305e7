"""Tiny random text-to-speech models and reference clips, built on the fly: nothing is downloaded.

Both engines are saved the way users' models are (a pocket-tts YAML config with its weights file;
an XTTS checkpoint directory) and loaded by voice/ through the same code as real ones. Builds are
cached under ~/.cache/talk-to-transformers/test-models, keyed by this file's content.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

CORPUS = [
    "hello world this is a tiny voice model. the quick brown fox jumps over the lazy dog!",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,!?'-",
] * 5


def _cached(kind: str, build: Callable[[Path, Path], None]) -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes() + torch.__version__.encode() + kind.encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "talk-to-transformers" / "test-models"
    target = root / f"voice-{kind}-{digest}"
    if not (target / "done").is_file():
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
        build(partial, target)
        (partial / "done").touch()
        try:
            partial.rename(target)
        except OSError:  # another process got there first
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _bpe(path: Path, specials: list[str], vocab_size: int) -> int:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.save(str(path))
    return tok.get_vocab_size()


def _build_pocket(out: Path, final: Path) -> None:
    from voice.pocket_engine import _import_pocket

    pocket_tts, configs_dir = _import_pocket()
    n_bins = _bpe(out / "tokenizer.json", ["[UNK]"], 200)
    config = yaml.safe_load((configs_dir / "english_2m_2026-10.yaml").read_text())
    del config["weights_path"], config["weights_path_without_voice_cloning"]
    config["flow_lm"]["lookup_table"].update(tokenizer="tokenizers", tokenizer_path=str(out / "tokenizer.json"),
                                             n_bins=n_bins)
    config["mimi"]["seanet"].update(dimension=64, n_filters=8)
    config["mimi"]["transformer"].update(d_model=64, num_heads=4, dim_feedforward=128, input_dimension=64,
                                         output_dimensions=[64])
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    model = pocket_tts.TTSModel.load_model(config=str(out / "config.yaml"))
    with torch.no_grad():
        # Random weights never say "end of speech"; this one does as soon as it may (after
        # pocket-tts's minimum of 6 frames), so each sentence lasts under a second.
        model.flow_lm.out_eos.bias.fill_(100.0)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config["weights_path"] = str(final / "model.safetensors")
    config["flow_lm"]["lookup_table"]["tokenizer_path"] = str(final / "tokenizer.json")
    (out / "config.yaml").write_text(yaml.safe_dump(config))


def _build_xtts(out: Path, final: Path) -> None:
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts, XttsArgs

    _bpe(out / "vocab.json", ["[STOP]", "[UNK]", "[SPACE]", "[START]", "[en]"], 120)
    args = XttsArgs(
        tokenizer_file=str(out / "vocab.json"), gpt_layers=2, gpt_n_model_channels=64, gpt_n_heads=4,
        gpt_num_audio_tokens=66, gpt_start_audio_token=64, gpt_stop_audio_token=65, gpt_max_audio_tokens=40,
        gpt_max_text_tokens=100, gpt_max_prompt_tokens=70, gpt_use_perceiver_resampler=True,
        decoder_input_dim=64, d_vector_dim=512,
    )
    config = XttsConfig(model_args=args)
    torch.manual_seed(0)
    model = Xtts(config)
    model.tokenizer = VoiceBpeTokenizer(vocab_file=str(out / "vocab.json"))
    model.init_models()
    model.eval()
    torch.save({"model": model.state_dict()}, out / "model.pth")
    config.save_json(str(out / "config.json"))


def tiny_pocket_config() -> Path:
    """The YAML config of a tiny random pocket-tts model (what `voice.model` names)."""
    return _cached("pocket", _build_pocket) / "config.yaml"


def tiny_xtts_dir() -> Path:
    """A tiny random XTTS checkpoint directory (config.json, model.pth, vocab.json)."""
    return _cached("xtts", _build_xtts)


def spoken_clip(path: Path, text: str = "The quick brown fox jumps over the lazy dog, twice, to show its voice.",
                *, stereo: bool = False) -> Path:
    """A few seconds of real speech from espeak-ng (22,050 Hz), optionally as 44.1 kHz stereo FLAC."""
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(raw), text], check=True, capture_output=True)
    if not stereo:
        raw.rename(path)
        return path
    data, rate = soundfile.read(str(raw), dtype="float32")
    import soxr

    mono = soxr.resample(data, rate, 44_100)
    soundfile.write(str(path), np.stack([mono, 0.5 * mono], axis=1), 44_100, format="FLAC")
    raw.unlink()
    return path


def voices_dir_with(root: Path, name: str = "ada") -> Path:
    """`root` as a voices_dir holding one registered voice (espeak-ng speech), its pocket state computed."""
    from core.config import VoiceSection
    from voice.registry import VoiceRegistry
    from voice.worker import acquire_worker

    worker = acquire_worker(VoiceSection(model=str(tiny_pocket_config()), voices_dir=root))
    try:
        VoiceRegistry(root).add(name, [spoken_clip(root.parent / f"{name}.wav")], f"{name} agreed, in writing.",
                                worker.engine)
    finally:
        worker.release()
    return root
