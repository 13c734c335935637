"""A slow, independent reference of MemoryLLM's arithmetic, written the way the original does it.

It shares nothing with latentmem's write/read code: no transformers Cache, no attention backend,
no rotary module, no adapter switching. Each layer is computed from raw weights on the whole
concatenated sequence [bos ; memory ; tokens] with an explicit prefix mask, LoRA is applied by hand
from the named adapter's A/B matrices, and RoPE is computed from the config (linear scaling divides
positions by the factor, as the original code does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear(module, x, adapter: str | None):
    """y = W x + b (+ scaling * B A x for the named LoRA adapter)."""
    base = getattr(module, "base_layer", module)
    y = F.linear(x, base.weight, base.bias)
    if adapter is not None and hasattr(module, "lora_A") and adapter in module.lora_A:
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        y = y + module.scaling[adapter] * F.linear(F.linear(x, a), b)
    return y


def rms_norm(norm, x):
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, config):
    """Rotate x [B, H, T, hd] by positions [T] (Llama convention: halves, not interleaved)."""
    hd = x.shape[-1]
    theta = config.rope_parameters.get("rope_theta", 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    pos = positions.float()
    if config.rope_parameters.get("rope_type") == "linear":
        pos = pos / config.rope_parameters["factor"]
    freqs = pos[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def layer_forward(layer, z, prefix_len: int, config, adapter: str | None, rope_positions=None):
    """One decoder layer on z [1, T, d] whose first `prefix_len` positions are keys/values only.

    `rope_positions [T]`: the RoPE position of each entry (default 0..T-1); masking always follows
    the order in z."""
    attn, T = layer.self_attn, z.shape[1]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    x = rms_norm(layer.input_layernorm, z)
    q = linear(attn.q_proj, x[:, prefix_len:], adapter).view(1, -1, heads, hd).transpose(1, 2)
    k = linear(attn.k_proj, x, adapter).view(1, T, kv_heads, hd).transpose(1, 2)
    v = linear(attn.v_proj, x, adapter).view(1, T, kv_heads, hd).transpose(1, 2)
    positions = torch.arange(T)
    rotated = positions if rope_positions is None else rope_positions
    q, k = rope(q, rotated[prefix_len:], config), rope(k, rotated, config)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    query_pos = positions[prefix_len:, None]
    visible = (positions[None, :] < prefix_len) | (positions[None, :] <= query_pos)
    scores = scores.masked_fill(~visible, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, -1, heads * hd)
    h = z[:, prefix_len:] + linear(attn.o_proj, out, adapter)
    y = rms_norm(layer.post_attention_layernorm, h)
    mlp = layer.mlp
    y = linear(mlp.down_proj, F.silu(linear(mlp.gate_proj, y, adapter)) * linear(mlp.up_proj, y, adapter), adapter)
    return h + y


def _layers(model):
    return model.backbone.model.layers


def reference_new_slots(model, stm, input_ids, adapter="default"):
    """New slots [L, K', d] written by input_ids into a pool `stm` [L, N, d] (None: empty pool)."""
    cfg, K = model.backbone.config, model.config.num_tokens
    h = F.embedding(input_ids.view(1, -1), model.backbone.model.embed_tokens.weight)
    n = h.shape[1]
    new = []
    for i, layer in enumerate(_layers(model)):
        if stm is None:
            z, prefix_len = h, 0
        else:
            parts = [stm[i : i + 1, -K:], h]
            if model.bos_embedding is not None:
                parts.insert(0, model.bos_embedding[i : i + 1])
            z = torch.cat(parts, dim=1)
            prefix_len = z.shape[1] - n - K + min(K, n)
        z = z.clone()
        z[:, -K:] += model.new_memory_positional_emb[0]
        out = layer_forward(layer, z, prefix_len, cfg, adapter)
        new.append(out[0, -K:])
        h = out[:, -n:]
    return torch.stack(new)


def reference_logits(model, stm, input_ids, adapter="decoder_adapter", slot_positions=None, prompt_start=None):
    """Logits [1, n, V] of a prompt reading the whole pool `stm` (None: no memory).

    `slot_positions [L, N]` and `prompt_start` give explicit RoPE positions to the slots and the
    prompt's first token (bos stays at 0); by default everything is numbered in order."""
    cfg = model.backbone.config
    h = F.embedding(input_ids.view(1, -1), model.backbone.model.embed_tokens.weight)
    n = h.shape[1]
    for i, layer in enumerate(_layers(model)):
        positions = None
        if stm is None:
            z, prefix_len = h, 0
        else:
            parts = [stm[i : i + 1], h]
            if model.bos_embedding is not None:
                parts.insert(0, model.bos_embedding[i : i + 1])
            z = torch.cat(parts, dim=1)
            prefix_len = z.shape[1] - h.shape[1]
            if slot_positions is not None:
                head = [torch.zeros(1, dtype=torch.long)] if model.bos_embedding is not None else []
                positions = torch.cat([*head, slot_positions[i], prompt_start + torch.arange(n)])
        h = layer_forward(layer, z, prefix_len, cfg, adapter, positions)
    h = rms_norm(model.backbone.model.norm, h)
    return F.linear(h, model.backbone.lm_head.weight)


def reference_greedy(model, stm, input_ids, steps: int, adapter="decoder_adapter"):
    """Greedy continuation by recomputing the whole sequence each step (no cache)."""
    ids = input_ids.view(1, -1)
    for _ in range(steps):
        next_id = reference_logits(model, stm, ids, adapter)[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids
