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
    from voice.speak.pocket_engine import _import_pocket

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
    from core.config.schema import VoiceSection
    from voice.speak.registry import VoiceRegistry
    from voice.speak.worker import acquire_worker

    worker = acquire_worker(VoiceSection(model=str(tiny_pocket_config()), voices_dir=root))
    try:
        VoiceRegistry(root).add(name, [spoken_clip(root.parent / f"{name}.wav")], f"{name} agreed, in writing.",
                                worker.engine)
    finally:
        worker.release()
    return root


# ---- listening: a tiny Whisper that knows two phrases -----------------------------------------------

# What the fake users say; the tiny recogniser is trained to write exactly these.
PHRASES = ("the word is apple", "tell me more")
WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
WHISPER_CHUNK_S = 4  # the tiny model hears 4 s at once (real ones 30 s): cheap to train and run


def spoken_phrase(text: str, *, speed: int = 150, pitch: int = 50, rate: int = 16_000) -> np.ndarray:
    """`text` said by espeak-ng, as mono float32 at `rate` (read in memory)."""
    import io

    import soxr

    wav = subprocess.run(["espeak-ng", "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    data, source_rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(data, source_rate, rate).astype(np.float32)


def _build_whisper(out: Path, final: Path) -> None:
    from tokenizers import decoders
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizerFast)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(PHRASES)] * 4 + CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(out / "bpe.json"))
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(out / "bpe.json"), unk_token="<|endoftext|>",
                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS})
    (out / "bpe.json").unlink()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in WHISPER_SPECIALS}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=WHISPER_CHUNK_S * 50, max_target_positions=64, decoder_start_token_id=sot,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=WHISPER_CHUNK_S)
    prompt = [sot, ids["<|notimestamps|>"]]  # English-only, like the default base.en
    targets = [prompt + tokenizer.encode(text, add_special_tokens=False) + [eot] for text in PHRASES]

    # Each phrase at several speeds and pitches, shifted, scaled and with a little noise.
    rng = np.random.default_rng(0)
    voices = [(speed, pitch) for speed in (130, 150, 175) for pitch in (35, 50, 65)]
    clips = [(spoken_phrase(text, speed=s, pitch=p), label) for label, text in enumerate(PHRASES) for s, p in voices]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        batch = [clips[i] for i in rng.integers(0, len(clips), 8)]
        audio = []
        for clip, _ in batch:
            padded = np.zeros(int(rng.uniform(0.1, 0.8) * 16_000) + len(clip) + 8_000, dtype=np.float32)
            padded[len(padded) - len(clip) - 8_000:len(padded) - 8_000] = clip * rng.uniform(0.3, 1.5)
            audio.append(padded + rng.normal(0, 0.003, len(padded)).astype(np.float32))
        features = torch.from_numpy(extractor(audio, sampling_rate=16_000, return_tensors="np").input_features)
        width = max(len(targets[label]) for _, label in batch)
        sequences = torch.tensor([targets[label] + [eot] * (width - len(targets[label])) for _, label in batch])
        logits = model(input_features=features, decoder_input_ids=sequences[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, len(prompt) - 1:].reshape(-1, logits.shape[-1]),
                                                 sequences[:, len(prompt):].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        is_multilingual=False, no_timestamps_token_id=ids["<|notimestamps|>"], suppress_tokens=[],
        begin_suppress_tokens=[eot],
    )
    model.save_pretrained(out)
    WhisperProcessor(extractor, tokenizer).save_pretrained(out)
    extractor.save_pretrained(out)  # preprocessor_config.json too: what CTranslate2's converter reads


def tiny_whisper_dir() -> Path:
    """A tiny English-only Whisper in transformers format, trained to write PHRASES when it hears them (4 s window)."""
    return _cached("whisper", _build_whisper)


def _convert_whisper(out: Path, final: Path) -> None:
    import ctranslate2

    out.rmdir()  # the converter makes its own directory
    ctranslate2.converters.TransformersConverter(
        str(tiny_whisper_dir()), copy_files=["tokenizer.json", "preprocessor_config.json"]
    ).convert(str(out), quantization="float32")


def tiny_faster_whisper_dir() -> Path:
    """The same tiny Whisper converted for faster-whisper (CTranslate2)."""
    return _cached("faster-whisper", _convert_whisper)
