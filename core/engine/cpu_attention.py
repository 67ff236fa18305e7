"""transformers' SDPA attention, without copying keys and values for grouped-query heads on CPU.

With a padding mask (a batch of rows, or a prompt continuing a cached prefix) transformers repeats
each key/value head for its query heads before calling SDPA: at 1,800 tokens of history that copy
took a sixth of SmolLM2's prefill. PyTorch's CPU kernel takes the grouped heads and a mask
directly (`enable_gqa`), with identical results; everything else is transformers' own path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "ttt_cpu_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    if (query.device.type == "cpu" and attention_mask is not None and query.shape[2] > 1
            and query.shape[1] != key.shape[1] and dropout == 0.0
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(NAME, grouped_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_grouped_sdpa(model) -> None:
    """Switch a CPU model that runs transformers' SDPA to this variant (other attention is left alone)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
