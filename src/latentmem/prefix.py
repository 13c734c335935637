"""Prefix attention: memory slots that supply keys and values only.

Both writing (writing.py) and reading (reading.py) place a prefix of memory vectors in front of a layer's input.
Prefix positions get no query, residual or MLP: only the layer's input norm, its k/v projections
and RoPE. This module computes those keys/values with the backbone's own modules, so every
backbone detail (grouped-query attention, projection biases, Qwen3's k_norm, RoPE scaling) is
honoured without copying a modeling file. Prefix keys/values go into a transformers `Cache`, and
the layer then attends to them exactly as to earlier tokens.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def rotary_embeddings(rotary_emb: nn.Module, like: torch.Tensor, start: int, length: int) -> tuple:
    """(cos, sin) of the backbone's RoPE for positions start..start+length-1, shaped for one sequence."""
    position_ids = torch.arange(start, start + length, device=like.device)[None]
    return rotary_emb(like, position_ids=position_ids)


def prefix_keys_values(
    layer: nn.Module, vectors: torch.Tensor, position_embeddings: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values, `[B, kv_heads, T, head_dim]`, that `layer` derives from `vectors [B, T, d]`.

    Mirrors the key/value half of the layer's attention: input norm, k/v projection (with any
    active LoRA adapter), optional per-head key norm, then RoPE at the given positions.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(vectors)
    head_shape = (*normed.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(normed).view(head_shape)
    if getattr(attn, "k_norm", None) is not None:  # Qwen3 normalises each key head before RoPE
        keys = attn.k_norm(keys)
    keys = keys.transpose(1, 2)
    values = attn.v_proj(normed).view(head_shape).transpose(1, 2)
    cos, sin = position_embeddings
    keys = _apply_rope_to_keys(attn, keys, cos, sin)
    return keys, values


def _apply_rope_to_keys(attn: nn.Module, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # The backbone's modeling module owns its RoPE formula; it rotates (q, k) pairs, so pass an
    # empty query (zero heads) alongside the keys.
    apply_rotary_pos_emb = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return apply_rotary_pos_emb(keys[:, :0], keys, cos, sin)[1]
