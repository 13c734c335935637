"""An attention backend for long memory prefixes with grouped-query attention.

transformers' SDPA backend copies every key/value head `num_heads / num_kv_heads` times whenever a
mask is present (it always is when memory is read: the prefix is visible, the prompt causal).
With thousands of memory slots per layer that copy costs more than the attention. Here the query
heads that share a key/value head are folded into that head's query rows instead, so keys and
values are used as they are. Registered through transformers' `AttentionInterface`, it applies to
backbones that asked for "sdpa"; any other choice (eager, flash attention) is left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "latentmem_sdpa"


def folded_gqa_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over query [B, H, q, hd] and key/value [B, kv_heads, k, hd], returning [B, q, H, hd]."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if groups == 1 or attention_mask is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    # Query head h uses key/value head h // groups: stack each group's rows, as [B, kv_heads, groups*q, hd].
    folded = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    mask = attention_mask.repeat(1, 1, groups, 1)  # row r*q + t sees what query row t sees
    out = F.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling
    )
    return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2).contiguous(), None


def use_folded_gqa_attention(model) -> None:
    """Switch a backbone that uses plain "sdpa" to the folded-GQA backend (same results, fewer copies)."""
    AttentionInterface.register(NAME, folded_gqa_sdpa_attention)  # idempotent
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)
