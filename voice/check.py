"""What `ttt check` says about voice: engine, model, licence, registered voices, each persona's voice.
Reads only the config and voices_dir: nothing is loaded or downloaded."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from core.config.schema import Config
from voice.speak.registry import VoiceRegistry

EXTRAS = {"pocket": ("voice", ("pocket_tts", "soxr", "soundfile", "pysbd", "num2words")),
          "xtts": ("xtts", ("TTS", "torchaudio", "soxr", "soundfile", "pysbd", "num2words"))}
_RECEIVE = ("discord.ext.voice_recv", "silero_vad", "davey")
LISTEN_EXTRAS = {"transformers": ("listen", _RECEIVE), "faster-whisper": ("faster-whisper", (*_RECEIVE, "faster_whisper"))}
XTTS_LICENCE = ("XTTS-v2 weights are under the Coqui Public Model License (https://coqui.ai/cpml): "
                "non-commercial use only")


@dataclass
class VoiceCheck:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what keeps voice from starting

    def require(self, extra: tuple[str, tuple[str, ...]], key: str, outcome: str) -> None:
        """A problem (and a line) for each module of the `(extra, modules)` pair that is not installed."""
        name, modules = extra
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            problem = f"{', '.join(missing)} missing: pip install 'talk-to-transformers[{name}]'"
            self.problems.append(f"{key}: {problem}")
            self.lines.append(f"  {outcome}: {problem}")


def check_voice(config: Config) -> VoiceCheck:
    """Lines for `ttt check`, and the problems that keep enabled voice from starting."""
    section, result = config.voice, VoiceCheck()
    if not section.enabled:
        result.lines.append("voice: off (voice.enabled)")
        return result
    model = section.model or "its default model"
    result.lines.append(
        f"voice: {section.engine} engine, {model}, device {section.device}, language {section.language}"
    )
    result.require(EXTRAS[section.engine], "voice", "CANNOT START")
    if section.engine == "xtts":
        result.lines.append(f"  licence: {XTTS_LICENCE}")
    elif not (section.model or "").endswith((".yaml", ".yml")) and not os.environ.get("HF_TOKEN"):
        result.lines.append("  HF_TOKEN is not set: pocket-tts's voice-cloning weights are gated (accept the terms at "
                            "https://huggingface.co/kyutai/pocket-tts), so cloned voices cannot load")
    registry = VoiceRegistry(section.voices_dir)
    names = registry.names()
    result.lines.append(f"  voices in {section.voices_dir}: {', '.join(names) or 'none registered'}")
    for name, persona in config.personas.items():
        if persona.voice is None:
            said = "silent (voice.require_registered)" if section.require_registered else "the engine's default voice"
            result.lines.append(f"  persona {name}: {said}")
        elif persona.voice in names:
            result.lines.append(f"  persona {name}: voice {persona.voice}")
        else:
            result.lines.append(f"  persona {name}: voice {persona.voice!r} is NOT REGISTERED "
                                f"(ttt voice add {persona.voice} CLIP... --consent TEXT); it stays silent")
    _check_listen(config, result)
    return result


def _check_listen(config: Config, result: VoiceCheck) -> None:
    listen = config.voice.listen
    if not listen.enabled:
        result.lines.append("  listening: off (voice.listen.enabled)")
        return
    from voice.listen.stt import DEFAULT_MODELS

    model = listen.model or DEFAULT_MODELS[listen.engine]
    result.lines.append(
        f"  listening: {listen.engine} Whisper {model}, device {listen.device}; "
        f"a turn ends after {listen.silence_ms} ms of silence; barge-in {'on' if listen.barge_in else 'off'}; "
        f"transcripts {'echoed in text' if listen.echo_text else 'not echoed'}"
    )
    result.require(LISTEN_EXTRAS[listen.engine], "voice.listen", "CANNOT LISTEN")
