"""Kyutai Pocket TTS (PyPI `pocket-tts`; code MIT, weights CC-BY-4.0): real time on one CPU core.

The voice-cloning weights are gated on the Hugging Face Hub: the operator accepts the terms at
https://huggingface.co/kyutai/pocket-tts and sets HF_TOKEN. Without them pocket-tts quietly
loads weights that cannot clone; this engine refuses to run on those instead.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import soxr
import torch

from voice.speak.tts import TextToSpeech, VoiceState, VoiceUnavailable, file_identity

DEFAULT_VARIANT = "english"
GAP_S = 0.25  # silence between reference clips
MAX_PROMPT_S = 30.0
NO_CLONING = (
    "pocket-tts loaded its weights without voice cloning: the cloning weights are gated. Accept the terms at "
    "https://huggingface.co/kyutai/pocket-tts, then set HF_TOKEN (a token of that account) and start again; "
    "or speak offline with the bundled Piper voice (it cannot clone): voice.engine: piper"
)


def _import_pocket():
    """pocket_tts, imported without letting it pin torch to one thread for the whole process."""
    threads = torch.get_num_threads()
    try:
        import pocket_tts
        from pocket_tts.utils import config as pocket_config
    except ImportError:
        raise VoiceUnavailable(
            "the pocket engine needs the voice extra: pip install 'talk-to-transformers[voice]'"
        ) from None
    finally:
        torch.set_num_threads(threads)  # importing pocket_tts calls torch.set_num_threads(1)
    return pocket_tts, pocket_config.CONFIGS_DIR


class PocketEngine(TextToSpeech):
    name = "pocket"
    reads_numbers = False

    def __init__(self, model, config_path: Path, model_id: str, shipped: bool, device: str):
        self.model = model
        self.sample_rate = model.sample_rate
        self.model_id = model_id
        self.device = device
        self._config_path = config_path
        self._shipped = shipped
        self._default: VoiceState | None = None

    @classmethod
    def load(cls, model: str | None, device: str) -> "PocketEngine":
        """`model`: a variant name (english, english_18m_2026-10, french, ...), a YAML config path, or None."""
        pocket_tts, configs_dir = _import_pocket()
        config_path, shipped = _config_path(model or DEFAULT_VARIANT, configs_dir)
        try:
            tts = pocket_tts.TTSModel.load_model(config=str(config_path))
        except Exception as exc:  # noqa: BLE001 - download, file and config errors alike
            raise VoiceUnavailable(f"could not load pocket-tts model {model or DEFAULT_VARIANT!r}: {exc}") from None
        if not tts.has_voice_cloning:
            raise VoiceUnavailable(NO_CLONING)
        tts.to(device)
        tts.eval()
        return cls(tts, config_path, _model_id(config_path, shipped, tts), shipped, device)

    def clone(self, clips: list[np.ndarray], rate: int) -> VoiceState:
        gap = np.zeros(int(GAP_S * rate), dtype=np.float32)
        joined = np.concatenate([piece for clip in clips for piece in (clip, gap)][:-1])
        joined = joined[: int(MAX_PROMPT_S * rate)]
        if rate != self.sample_rate:
            joined = soxr.resample(joined, rate, self.sample_rate)
        prompt = torch.from_numpy(np.ascontiguousarray(joined, dtype=np.float32)).unsqueeze(0)
        return self.model.get_state_for_audio_prompt(prompt)

    def save_state(self, state: VoiceState, path: Path) -> None:
        from pocket_tts import export_model_state

        export_model_state(state, path)

    def load_state(self, path: Path) -> VoiceState:
        state = self.model.get_state_for_audio_prompt(Path(path))
        # Copied out of the memory-mapped file: the cache file may be replaced while the state is in use.
        return {module: {k: v.clone() for k, v in tensors.items()} for module, tensors in state.items()}

    def default_state(self) -> VoiceState:
        if self._default is None:
            from pocket_tts.default_parameters import get_default_voice_for_language

            # Shipped variants come with precomputed voices; other configs clone pocket-tts's default clip.
            if self._shipped:
                voice = get_default_voice_for_language(self._config_path.stem)
            else:
                voice = get_default_voice_for_language(None, config=str(self._config_path))
            try:
                self._default = self.model.get_state_for_audio_prompt(voice)
            except Exception as exc:  # noqa: BLE001 - a download or a file problem
                raise VoiceUnavailable(f"pocket-tts's default voice {voice!r} could not be loaded: {exc}") from None
        return self._default

    def synthesize(self, state: VoiceState, text: str, stop: threading.Event) -> Iterator[np.ndarray]:
        for chunk in self.model.generate_audio_stream(state, text, stop=stop):
            yield chunk.detach().to("cpu", dtype=torch.float32).numpy()


def _config_path(model: str, configs_dir: Path) -> tuple[Path, bool]:
    if model.endswith((".yaml", ".yml")):
        path = Path(model).expanduser()
        if "://" not in model and not path.is_file():
            raise VoiceUnavailable(f"voice.model: no pocket-tts config at {path}")
        return path, False
    path = configs_dir / f"{model}.yaml"
    if not path.is_file():
        variants = ", ".join(sorted(p.stem for p in configs_dir.glob("*.yaml")))
        raise VoiceUnavailable(f"voice.model: pocket-tts has no variant {model!r}; pick one of: {variants}")
    return path, True


def _model_id(config_path: Path, shipped: bool, tts) -> str:
    config = tts.config
    if shipped:
        return f"pocket:{config_path.stem}:{config.weights_path}"
    parts = [f"pocket:{file_identity(config_path)}"]
    for weights in (config.weights_path, config.flow_lm.weights_path, config.mimi.weights_path):
        if weights and "://" not in weights and Path(weights).is_file():
            parts.append(file_identity(Path(weights)))
        elif weights:
            parts.append(weights)
    return "|".join(parts)
