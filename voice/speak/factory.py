"""Loading the configured text-to-speech engine (`voice.engine`, `voice.model`, `voice.device`)."""

from __future__ import annotations

from core.config.schema import VoiceSection
from core.devices import DeviceUnavailable, pick_device
from core.loading import model_loading
from voice.speak.tts import TextToSpeech, VoiceUnavailable


def load_tts(section: VoiceSection) -> TextToSpeech:
    """Load the configured engine and model (downloads on first use); raises VoiceUnavailable."""
    try:
        device = pick_device(section.device, "voice.device")
    except DeviceUnavailable as exc:
        raise VoiceUnavailable(str(exc)) from None
    with model_loading():  # never next to another model's load in this process (see core.loading)
        if section.engine == "pocket":
            from voice.speak.pocket_engine import PocketEngine

            return PocketEngine.load(section.model, device)
        if section.engine == "piper":
            from voice.speak.piper_engine import PiperEngine

            return PiperEngine.load(section.model)  # on the CPU: see piper_engine.py
        from voice.speak.xtts_engine import XttsEngine

        return XttsEngine.load(section.model, device, section.language)
