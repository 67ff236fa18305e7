"""Lower-precision CPU weights (`generator.cpu_dtype`): int8 and int4 linear layers.

A batch-1 decode step reads every weight once for one row of arithmetic: it is bound by memory,
so fewer bytes per weight is what makes a lone reply fast. Larger passes (prefills, big batches)
are bound by arithmetic instead, where the float kernels (bfloat16 on AMX) win.
- int8: weights in 8 bits (a scale per output channel), inputs quantized on the fly (fbgemm).
- int4: weights in 4 bits, groups of 32 inputs with a scale and a minimum each (GGUF's Q4_1
  layout: a Q4_1 file keeps its 4-bit values; scales and minimums are rounded to bfloat16), for
  passes of a few rows; bfloat16 weights (float32 on a CPU without bfloat16) for larger passes.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# int8 quantizes activations on the fly, one scale per tensor: a layer whose input peaks far above
# its typical magnitude (SmolLM2 has a few, ratios of 800 to 10,000) loses its small values, which
# tripled perplexity when every layer was quantized. Those few layers stay in float.
OUTLIER_RATIO = 100
SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. Hello! How are you today? 1, 2, 3."

INT4_GROUP = 32
# Up to this many rows a pass reads int4 weights; beyond, bfloat16 matrix products are faster (measured
# on this project's 2-core Xeon with AMX, 576x1536 layers: 96 against 106 us at 8 rows, 363 against
# 130 us at 32; at one row 23 against 99 us).
INT4_MAX_ROWS = 8


def quantize(model, tokenizer, dtype: str):
    """The model with its linear layers in `dtype` ("int8" or "int4"), for the CPU."""
    if dtype == "int8":
        return _quantize_int8(model, tokenizer)
    return _quantize_int4(model)


def has_quantized_weights(model) -> bool:
    return any(isinstance(m, (torch.ao.nn.quantized.dynamic.Linear, Int4Linear)) for m in model.modules())


class Int4Linear(torch.nn.Module):
    """A linear layer with 4-bit weights for small passes and bfloat16 weights for large ones.

    Only the layer's inputs are rounded to bfloat16, for its kernels; its output and the rest of the
    model (norms, attention, the residual stream) stay in float32, so that, as in float32, a row's
    result does not depend on the rows it is batched with (a bfloat16 model's attention does).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        self.register_buffer("weight", weight.to(_float_weights_dtype()))
        self.bias = bias
        # The kernel takes outputs in multiples of 16 (a vocabulary such as GPT-2's 50,257 is not):
        # padded with zero rows, cut off after the product.
        padded = F.pad(weight, (0, 0, 0, -self.out_features % 16))
        groups = padded.reshape(padded.shape[0], -1, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.flatten(1), 1))
        # The kernel computes (q - 8) * scale + zero: zero = low + 8 * scale gives q * scale + low.
        zero = low + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16))

    @staticmethod
    def fits(in_features: int) -> bool:
        """The int4 kernel's shapes: inputs in whole groups."""
        return in_features % INT4_GROUP == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > INT4_MAX_ROWS:
            out = F.linear(x.to(self.weight.dtype), self.weight)
        else:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()
            out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scales_and_zeros)
            out = out[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _float_weights_dtype() -> torch.dtype:
    """bfloat16 where the CPU has fast kernels for it (AMX, AVX512-BF16), else float32."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def _quantize_int4(model):
    """Replace every linear layer (and GPT-2's Conv1D) whose inputs come in whole groups by an
    Int4Linear, quantized from the float32 weights."""
    from transformers.pytorch_utils import Conv1D

    replaced = total = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                weight = child.weight
            elif isinstance(child, Conv1D):
                weight = child.weight.t()  # Conv1D stores (in, out)
            else:
                continue
            total += 1
            if Int4Linear.fits(weight.shape[1]):
                setattr(parent, name, Int4Linear(weight, child.bias))
                replaced += 1
    log.info("int4: %d of %d linear layers quantized (the others' inputs are not in groups of %d)", replaced, total,
             INT4_GROUP)
    return model


def _quantize_int8(model, tokenizer):
    """int8 weights (one scale per output channel) for the linear layers whose inputs have no outliers,
    measured on a sample text; activations are quantized on the fly (CPU only)."""
    peaks: dict[str, float] = {}

    def measure(name):
        def hook(_module, inputs):
            x = inputs[0].detach().abs().float()
            peaks[name] = max(peaks.get(name, 0.0), float(x.max() / x.mean().clamp(min=1e-12)))
        return hook

    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    hooks = [m.register_forward_pre_hook(measure(name)) for name, m in linears.items()]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([tokenizer(SAMPLE_TEXT)["input_ids"]], device=model.device))
    finally:
        for hook in hooks:
            hook.remove()
    quantized = {name for name in linears if peaks.get(name, 0.0) <= OUTLIER_RATIO}
    log.info("int8: %d of %d linear layers quantized (the others' inputs have outliers)", len(quantized), len(linears))
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch announces the successor (torchao); this API still works
        return torch.ao.quantization.quantize_dynamic(model, {name: qconfig for name in quantized}, dtype=torch.qint8)
