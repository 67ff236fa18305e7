"""Each kind of quantized layer, checked against its float product on this CPU before it serves.

PyTorch picks its kernels by CPU capability (`ATEN_CPU_CAPABILITY`: default, avx2, avx512), and
fbgemm and oneDNN by their own probes: a kernel tuned on one family can misbehave on another. When
an engine starts, one layer of each kind and shape runs on probe rows, and must
- give the float product of the weights it holds, its inputs rounded as the layer rounds them
  (within TOLERANCE of each row's size: float sums in another order differ by about 1e-6);
- give a row the same bits in a pass of several rows as alone, up to the largest pass it serves;
- give the same bits on every thread count the engine may use.
A kernel that fails serves nothing: the engine does not start, and the message names this CPU's
capability and the setting to use instead.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from core.engine.cpu_weights import (
    INT4_MAX_ROWS, INT8_LEVELS, INT8_ZERO, TINY, Int4Linear, Int8Linear, quantized_layers,
)

TOLERANCE = 1e-2
PASS_SIZES = {Int4Linear: range(2, INT4_MAX_ROWS + 1), Int8Linear: (2, 3, 5, 8, 13, 33)}
SETTING = {Int4Linear: "int4", Int8Linear: "int8"}


class KernelMismatch(Exception):
    """A quantized layer's kernel is wrong on this CPU; the message says which setting to use."""


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def check_kernels(model, thread_counts: Sequence[int]) -> None:
    """Check one layer of each quantized kind and shape in `model`; raises KernelMismatch."""
    checked = set()
    for layer in quantized_layers(model):
        kind = (type(layer), layer.in_features, layer.out_features)
        if kind in checked:
            continue
        checked.add(kind)
        problem = kernel_problem(layer, lambda x, layer=layer: _reference(layer, x), layer.in_features,
                                 PASS_SIZES[type(layer)], thread_counts)
        if problem:
            setting = SETTING[type(layer)]
            raise KernelMismatch(
                f"generator.cpu_dtype {setting}: on this CPU (PyTorch capability {cpu_capability()}) the {setting} "
                f"kernel of the {layer.out_features}x{layer.in_features} layers {problem}; "
                f"set generator.cpu_dtype to float32 (TTT_GENERATOR__CPU_DTYPE=float32)")


def kernel_problem(product: Callable[[torch.Tensor], torch.Tensor], reference: Callable[[torch.Tensor], torch.Tensor],
                   in_features: int, pass_sizes: Sequence[int], thread_counts: Sequence[int]) -> str | None:
    """What is wrong with `product` (float32 [rows, in_features] -> [rows, out]) against `reference`
    (the same in float64), or None."""
    rows = max(pass_sizes)
    x = _probe_rows(rows, in_features)
    threads = torch.get_num_threads()
    by_threads = {}
    try:
        for count in thread_counts:
            torch.set_num_threads(count)
            by_threads[count] = product(x)
    finally:
        torch.set_num_threads(threads)
    first, out = next(iter(by_threads.items()))
    wanted = reference(x)
    error = float(((out.double() - wanted).norm(dim=-1) / wanted.norm(dim=-1).clamp(min=1e-30)).max())
    if not error <= TOLERANCE:
        return f"gives products {error:.1%} away from the float product"
    for count, other in by_threads.items():
        if not torch.equal(other, out):
            return f"gives other results on {count} threads than on {first}"
    alone = [product(x[i:i + 1])[0] for i in range(rows)]
    for size in pass_sizes:
        together = product(x[:size])
        for i in range(size):
            if not torch.equal(together[i], alone[i]):
                return f"gives row {i + 1} of a pass of {size} rows another result than alone"
    return None


def _probe_rows(rows: int, in_features: int) -> torch.Tensor:
    """Random rows of several magnitudes, and one that sets every input to its extreme (an 8-bit
    kernel that adds pairs of products in 16 bits overflows on it)."""
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(in_features))
    x[0] = 1.0
    x[1] = torch.where(torch.arange(in_features) % 2 == 0, 1.0, -1.0)
    x[2:] *= torch.logspace(-3, 3, rows - 2)[:, None]
    return x


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The float64 product of the weights the layer holds, its inputs rounded as it rounds them."""
    if isinstance(layer, Int4Linear):
        inputs, weight = x.bfloat16().double(), layer.weight.double()
    else:
        peak = x.abs().amax(-1, keepdim=True).clamp(min=TINY)
        levels = (torch.round(x / peak * INT8_LEVELS) + INT8_ZERO).clamp(0, 255) - INT8_ZERO
        inputs, weight = (levels / INT8_LEVELS * peak).double(), layer.dequantized().double()
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(inputs, weight, bias)
