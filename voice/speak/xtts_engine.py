"""Coqui XTTS-v2 through the maintained `coqui-tts` (import name `TTS`), for GPU hosts.

Its weights are under the Coqui Public Model License: non-commercial use only (the licence
can no longer be bought). Downloading them needs COQUI_TOS_AGREED=1, the operator's agreement.
Audio is never read through torchaudio.load (it needs torchcodec): clips arrive as arrays.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from voice.speak.tts import TextToSpeech, VoiceState, VoiceUnavailable, file_identity
from voice.speak.xtts_decode import WindowedDecoder

DEFAULT_MODEL = "tts_models/multilingual/multi-dataset/xtts_v2"
LICENCE = (
    "XTTS-v2 weights are under the non-commercial Coqui Public Model License (https://coqui.ai/cpml): "
    "no commercial use"
)
CHECKPOINT_FILES = ("config.json", "model.pth", "vocab.json")


class XttsEngine(TextToSpeech):
    name = "xtts"
    reads_numbers = True  # XTTS's tokenizer expands numbers, symbols and abbreviations per language

    def __init__(self, model, model_id: str, language: str, device: str):
        self.model = model
        self.sample_rate = int(model.config.model_args.output_sample_rate)
        self.model_id = model_id
        self.language = language
        self.device = device

    @classmethod
    def load(cls, model: str | None, device: str, language: str) -> "XttsEngine":
        """`model`: a checkpoint directory (config.json, model.pth, vocab.json), a Coqui model name, or None."""
        try:
            from TTS.tts.configs.xtts_config import XttsConfig
            from TTS.tts.models.xtts import Xtts
        except ImportError:
            raise VoiceUnavailable(
                "the xtts engine needs its extra: pip install 'talk-to-transformers[xtts]'"
            ) from None
        name = model or DEFAULT_MODEL
        directory = Path(name).expanduser()
        if directory.is_dir():
            missing = [f for f in CHECKPOINT_FILES if not (directory / f).is_file()]
            if missing:
                raise VoiceUnavailable(f"voice.model: {directory} lacks {', '.join(missing)}")
            model_id = "xtts:" + "|".join(file_identity(directory / f) for f in CHECKPOINT_FILES)
        else:
            directory = _download(name)
            model_id = f"xtts:{name}"
        config = XttsConfig()
        config.load_json(str(directory / "config.json"))
        if language not in config.languages:
            raise VoiceUnavailable(f"voice.language {language!r}: XTTS speaks {', '.join(config.languages)}")
        xtts = Xtts(config)
        try:
            xtts.load_checkpoint(config, checkpoint_dir=str(directory), eval=True)
        except Exception as exc:  # noqa: BLE001 - a damaged or mismatched checkpoint
            raise VoiceUnavailable(f"could not load the XTTS checkpoint in {directory}: {exc}") from None
        xtts.to(device)
        _fold_weight_norm(xtts.hifigan_decoder.waveform_decoder)
        return cls(xtts, model_id, language, device)

    def clone(self, clips: list[np.ndarray], rate: int) -> VoiceState:
        config = self.model.config
        audio = [torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).unsqueeze(0) for c in clips]
        audio = [a[:, : rate * config.max_ref_len] for a in audio]
        embedding = torch.stack([self.model.get_speaker_embedding(a, rate) for a in audio]).mean(dim=0)
        latents = self.model.get_gpt_cond_latents(
            torch.cat(audio, dim=-1), rate, length=config.gpt_cond_len, chunk_length=config.gpt_cond_chunk_len
        )
        return {"gpt_cond_latent": latents.cpu(), "speaker_embedding": embedding.cpu()}

    def save_state(self, state: VoiceState, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    def load_state(self, path: Path) -> VoiceState:
        from safetensors.torch import load_file

        return {k: v.clone() for k, v in load_file(str(path)).items()}  # not tied to the mapped file

    def default_state(self) -> VoiceState | None:
        speakers = self.model.speaker_manager
        if speakers is None or not speakers.speaker_names:
            return None
        voice = speakers.speakers[speakers.speaker_names[0]]
        return {"gpt_cond_latent": voice["gpt_cond_latent"], "speaker_embedding": voice["speaker_embedding"]}

    def synthesize(self, state: VoiceState, text: str, stop: threading.Event) -> Iterator[np.ndarray]:
        # Xtts.inference_stream's GPT loop, with a decoder that decodes each window once (voice/speak/xtts_decode.py).
        model, config = self.model, self.model.config
        chunks = _stream(model, self.language, text, state, stop, temperature=config.temperature,
                         length_penalty=float(config.length_penalty), repetition_penalty=config.repetition_penalty,
                         top_k=config.top_k, top_p=config.top_p)
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                yield chunk.detach().to("cpu", dtype=torch.float32).numpy()
        finally:
            chunks.close()


@torch.inference_mode()
def _stream(model, language: str, text: str, state: VoiceState, stop: threading.Event,
            **sampling) -> Iterator[torch.Tensor]:
    device = model.device
    tokens = torch.IntTensor(model.tokenizer.encode(text.strip().lower(), lang=language)).unsqueeze(0).to(device)
    if tokens.shape[-1] >= model.args.gpt_max_text_tokens:
        raise ValueError(f"XTTS says fewer than {model.args.gpt_max_text_tokens} text tokens at once; "
                         f"this sentence has {tokens.shape[-1]}")
    inputs = model.gpt.compute_embeddings(state["gpt_cond_latent"].to(device), tokens)
    generator = model.gpt.get_generator(
        fake_inputs=inputs, do_sample=True, num_beams=1, num_return_sequences=1, output_attentions=False,
        output_hidden_states=True, return_dict_in_generate=True, **sampling,
    )
    decoder = WindowedDecoder(model.hifigan_decoder, state["speaker_embedding"].to(device))
    latents: list[torch.Tensor] = []
    for _, latent in generator:
        if stop.is_set():
            return
        latents.append(latent[0])  # [1, C] -> [C]
        if (audio := decoder.chunk(latents)) is not None:
            yield audio
    if (audio := decoder.chunk(latents, final=True)) is not None and len(audio):
        yield audio


def _fold_weight_norm(module: torch.nn.Module) -> None:
    """Compute weight-normed weights once instead of at every call (a fifth of a short decode's time);
    the same weights, so the same audio. Xtts.load_checkpoint leaves them parametrized."""
    from torch.nn.utils import parametrize

    for layer in module.modules():
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight")


def _download(name: str) -> Path:
    from TTS.utils.manage import ModelManager

    if os.environ.get("COQUI_TOS_AGREED") != "1":
        raise VoiceUnavailable(
            f"{LICENCE}. To download {name}, agree to that licence by setting COQUI_TOS_AGREED=1, "
            "or point voice.model at a checkpoint directory"
        )
    try:
        _, config_path, _ = ModelManager(progress_bar=False).download_model(name)
    except Exception as exc:  # noqa: BLE001 - unknown name, network
        raise VoiceUnavailable(f"could not get the Coqui model {name!r}: {exc}") from None
    return Path(config_path).parent
