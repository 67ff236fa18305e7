"""What `training.base_model` and `--base-model` may name: a persona of the config (its model: so
`--base-model smol` fine-tunes the default persona's base), a GGUF file (`package://PKG/FILE.gguf`
or a `.gguf` path), a local directory or a Hugging Face Hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config.schema import PersonaConfig
from core.engine.models import ModelSource, ModelUnavailable, dequantized, resolve_source


class BaseModelError(Exception):
    """The base model cannot be used; the message says why, in one line."""


@dataclass(frozen=True)
class BaseModel:
    model: str  # as a persona's `model` names it: what the printed config lines say
    persona: str | None = None  # the persona it was named by

    @property
    def label(self) -> str:
        return f"{self.persona} ({self.model})" if self.persona else self.model


def resolve_base_model(name: str, personas: dict[str, PersonaConfig]) -> BaseModel:
    """A persona's name (when it is not also a local path) becomes that persona's model."""
    persona = personas.get(name)
    if persona is None or Path(name).exists():
        return BaseModel(name)
    if persona.endpoint is not None:
        raise BaseModelError(f"persona {name!r} runs on {persona.endpoint.base_url}: there are no weights here "
                             "to fine-tune; name a persona with a local model")
    if persona.adapter:
        raise BaseModelError(f"persona {name!r} is a LoRA adapter on {persona.model}: fine-tune that "
                             f"(--base-model {persona.model})")
    model = str(Path(persona.model) / persona.gguf_file) if persona.gguf_file else persona.model
    return BaseModel(model, name)


def weights_location(base: BaseModel, cache_dir: Path | None = None) -> str:
    """What transformers' from_pretrained loads: a GGUF is dequantized once (shared with serving's cache)."""
    try:
        source: ModelSource = resolve_source(base.model)
        return str(dequantized(source, cache_dir)) if source.gguf_file else source.model
    except ModelUnavailable as exc:
        raise BaseModelError(f"base model {base.label}: {exc}") from None
