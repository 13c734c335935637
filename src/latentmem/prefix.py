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
    keys, values = unrotated_keys_values(layer, vectors)
    cos, sin = position_embeddings
    return rotate_keys(layer, keys, cos, sin), values


def unrotated_keys_values(layer: nn.Module, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefix_keys_values` before RoPE: keys (key norm included) and values, `[B, kv_heads, T, head_dim]`.

    A slot's unrotated key depends on the slot alone, never on its position: a memory that only
    moves its slots (reading.py) rotates these again instead of projecting the slots anew.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(vectors)
    head_shape = (*normed.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(normed).view(head_shape)
    if getattr(attn, "k_norm", None) is not None:  # Qwen3 normalises each key head before RoPE
        keys = attn.k_norm(keys)
    keys = keys.transpose(1, 2)
    values = attn.v_proj(normed).view(head_shape).transpose(1, 2)
    return keys, values


def rotate_keys(layer: nn.Module, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE applied to `keys [B, kv_heads, T, head_dim]` with the layer's own formula (`cos`, `sin`: `[B, T, head_dim]`)."""
    return _apply_rope_to_keys(layer.self_attn, keys, cos, sin)


def rotate_keys_into(
    layer: nn.Module, out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """`out[...] = rotate_keys(layer, keys, cos, sin)`, written in place.

    Where the backbone's RoPE is the usual rotate-half formula, `k * cos + rotate_half(k) * sin`
    (checked once per attention class, bit for bit on a probe), the two halves are computed straight
    into `out` with half-size temporaries: the same products and sums, so the same bits, in half the
    passes over memory. Any other formula is applied as the backbone writes it, then copied.
    """
    attn = layer.self_attn
    if _rotates_halves(attn, keys, cos):
        h = keys.shape[-1] // 2
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        first, second = keys[..., :h], keys[..., h:]
        out_first, out_second = out[..., :h], out[..., h:]
        torch.mul(first, cos[..., :h], out=out_first)
        out_first.sub_(second * sin[..., :h])  # + (-second) * sin: the same bits
        torch.mul(second, cos[..., h:], out=out_second)
        out_second.add_(first * sin[..., h:])
    else:
        out.copy_(rotate_keys(layer, keys, cos, sin))


_ROTATE_HALF: dict[type, bool] = {}  # attention class -> whether its RoPE is the rotate-half formula


def _rotates_halves(attn: nn.Module, keys: torch.Tensor, cos: torch.Tensor) -> bool:
    head_dim = keys.shape[-1]
    if head_dim % 2 or cos.shape[-1] != head_dim:
        return False
    kind = type(attn)
    if kind not in _ROTATE_HALF:
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(1, 2, 5, head_dim, generator=g, dtype=torch.float32)
        angles = torch.randn(1, 5, head_dim, generator=g, dtype=torch.float32)
        c, s = angles.cos(), angles.sin()
        want = _apply_rope_to_keys(attn, probe, c, s)
        got = torch.empty_like(probe)
        h = head_dim // 2
        got[..., :h] = probe[..., :h] * c[:, None, :, :h] - probe[..., h:] * s[:, None, :, :h]
        got[..., h:] = probe[..., h:] * c[:, None, :, h:] + probe[..., :h] * s[:, None, :, h:]
        _ROTATE_HALF[kind] = want.shape == got.shape and torch.equal(want, got)
    return _ROTATE_HALF[kind]


def _apply_rope_to_keys(attn: nn.Module, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # The backbone's modeling module owns its RoPE formula; it rotates (q, k) pairs, so pass an
    # empty query (zero heads) alongside the keys.
    apply_rotary_pos_emb = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return apply_rotary_pos_emb(keys[:, :0], keys, cos, sin)[1]
