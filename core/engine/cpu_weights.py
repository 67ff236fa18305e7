"""Lower-precision CPU weights (`generator.cpu_dtype`): int8 and int4 linear layers.

A batch-1 decode step reads every weight once for one row of arithmetic: it is bound by memory,
so fewer bytes per weight is what makes a lone reply fast. Larger passes (prefills, big batches)
are bound by arithmetic instead, where the float kernels (bfloat16 on AMX) win.
- int8: weights in 8 bits (a scale per output channel); each row of inputs is quantized on the fly
  with its own scale (fbgemm), so that a row's result never depends on the rows that share its pass.
- int4: weights in 4 bits, groups of 32 inputs with a scale and a minimum each (GGUF's Q4_1
  layout: a Q4_1 file keeps its 4-bit values; scales and minimums are rounded to bfloat16), for
  passes of a few rows; larger passes use float copies of the same 4-bit weights.
Kernels differ between CPU families (AVX2, AVX-512, AMX): `core/engine/cpu_kernels.py` checks
each kind of layer against its float product on this CPU when a model loads.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# int8 quantizes activations on the fly: a layer whose input peaks far above its typical magnitude
# (SmolLM2 has a few, ratios of 800 to 10,000) loses its small values, which tripled perplexity
# when every layer was quantized. Those few layers stay in float.
OUTLIER_RATIO = 100
SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. Hello! How are you today? 1, 2, 3."
# A row's inputs, divided by its peak, become 7-bit levels 1..127 around 64: on CPUs without VNNI
# (AVX2, older AVX-512) fbgemm adds pairs of 8-bit products in 16 bits, which full 8-bit inputs
# would overflow (the reason for torch's `reduce_range`).
INT8_LEVELS = 63
INT8_ZERO = 64
TINY = torch.finfo(torch.float32).tiny

INT4_GROUP = 32
# Up to this many rows a pass reads int4 weights; beyond, float matrix products are faster (measured
# on this project's 2-core Xeon with AMX, 576x1536 layers: 96 against 106 us at 8 rows, 363 against
# 130 us at 32; at one row 23 against 99 us; with AVX2 only, float32: 46 against 43 us a row at 8 rows).
INT4_MAX_ROWS = 8


def quantize(model, tokenizer, dtype: str):
    """The model with its linear layers in `dtype` ("int8" or "int4"), for the CPU."""
    if dtype == "int8":
        return _quantize_int8(model, tokenizer)
    return _quantize_int4(model)


def quantized_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]


def has_quantized_weights(model) -> bool:
    return bool(quantized_layers(model))


class Int4Linear(torch.nn.Module):
    """A linear layer with 4-bit weights for small passes and float copies of the same 4-bit weights
    for large ones (bfloat16 where the CPU has fast kernels for it, else float32).

    The layer's inputs and outputs are rounded to bfloat16 (the kernel's types); the rest of the
    model (norms, attention, the residual stream) stays in float32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._padded = self.out_features % 16 != 0
        # The kernel takes outputs in multiples of 16 (a vocabulary such as GPT-2's 50,257 is not):
        # padded with zero rows, cut off after the product.
        padded = F.pad(weight.detach().float(), (0, 0, 0, -self.out_features % 16))
        groups = padded.reshape(padded.shape[0], -1, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=TINY)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).flatten(1), 1))
        # The kernel computes (q - 8) * scale + zero: zero = low + 8 * scale gives q * scale + low.
        scale, zero = scale.bfloat16(), (low + 8 * scale).bfloat16()
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], -1))
        # The weights the kernel multiplies by, in float32 exactly ((q - 8) * scale is exact in float32).
        dequantized = (q - 8) * scale.float()[..., None] + zero.float()[..., None]
        self.register_buffer("weight", dequantized.flatten(1)[:self.out_features].to(_float_weights_dtype()))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @staticmethod
    def fits(in_features: int) -> bool:
        """The int4 kernel's shapes: inputs in whole groups."""
        return in_features % INT4_GROUP == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls this ~200 times: as few tensor operations as the result allows.
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if flat.shape[0] > INT4_MAX_ROWS:  # rounded to bfloat16 as the kernel rounds its outputs
            weight = self.weight
            out = F.linear(flat.to(weight.dtype), weight).bfloat16()
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scales_and_zeros)
            if self._padded:
                out = out[:, :self.out_features]
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        bias = self.bias
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(torch.nn.Module):
    """A linear layer with 8-bit weights (a scale per output channel) whose inputs are quantized row
    by row: each row is divided by its own peak and quantized with one fixed scale, so a row's
    result is the same whatever the rows beside it, and integer sums make it the same on any
    number of threads."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        scale = (weight.abs().amax(1) / 127).clamp(min=TINY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch announces the successor (torchao); this API still works
            qweight = torch.quantize_per_channel(weight, scale.double(), torch.zeros(len(scale), dtype=torch.long),
                                                 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        peak = torch.linalg.vector_norm(flat, math.inf, dim=-1, keepdim=True).clamp_(min=TINY)
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            flat / peak, 1.0 / INT8_LEVELS, INT8_ZERO, self._packed) * peak
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def dequantized(self) -> torch.Tensor:
        """The float weights the kernel multiplies by."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize()

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features + 4 * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _float_weights_dtype() -> torch.dtype:
    """bfloat16 where the CPU has fast kernels for it (AMX, AVX512-BF16), else float32."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def _linear_weight(module) -> torch.Tensor | None:
    """A linear layer's [out, in] weight (GPT-2's Conv1D is one too), else None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.weight
    if isinstance(module, Conv1D):
        return module.weight.t()  # Conv1D stores (in, out)
    return None


def _replace_linears(model, make, wanted) -> tuple[int, int]:
    """Replace every linear layer for which `wanted(name, weight)` holds by `make(weight, bias)`;
    returns (replaced, total)."""
    replaced = total = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            weight = _linear_weight(child)
            if weight is None:
                continue
            total += 1
            if wanted(f"{parent_name}.{name}" if parent_name else name, weight):
                setattr(parent, name, make(weight, child.bias))
                replaced += 1
    return replaced, total


def _quantize_int4(model):
    """Every linear layer whose inputs come in whole groups as an Int4Linear, from the float32 weights."""
    replaced, total = _replace_linears(model, Int4Linear, lambda _, weight: Int4Linear.fits(weight.shape[1]))
    log.info("int4: %d of %d linear layers quantized (the others' inputs are not in groups of %d)", replaced, total,
             INT4_GROUP)
    return model


def _quantize_int8(model, tokenizer):
    """Int8Linear for the linear layers whose inputs have no outliers, measured on a sample text."""
    peaks: dict[str, float] = {}

    def measure(name):
        def hook(_module, inputs):
            x = inputs[0].detach().abs().float()
            peaks[name] = max(peaks.get(name, 0.0), float(x.max() / x.mean().clamp(min=1e-12)))
        return hook

    linears = {name: m for name, m in model.named_modules() if _linear_weight(m) is not None}
    hooks = [m.register_forward_pre_hook(measure(name)) for name, m in linears.items()]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([tokenizer(SAMPLE_TEXT)["input_ids"]], device=model.device))
    finally:
        for hook in hooks:
            hook.remove()
    quantized = {name for name in linears if peaks.get(name, 0.0) <= OUTLIER_RATIO}
    replaced, total = _replace_linears(model, Int8Linear, lambda name, _: name in quantized)
    log.info("int8: %d of %d linear layers quantized (the others' inputs have outliers)", replaced, total)
    return model
