"""A Llama-architecture GGUF file as a plain `LlamaForCausalLM`, read with the `gguf` package.

transformers loads GGUF files too (`from_pretrained(folder, gguf_file=...)`), but on 2 CPU cores that
takes ~25 s for SmolLM2-135M (`benchmarks/bench_load.py`), most of it on the file's metadata and tokenizer. The `gguf` package's
reader memory-maps the file and its numpy dequantizer unpacks the quantized blocks (Q4_1, Q8_0, ...):
SmolLM2-135M's Q4_1 file becomes a float model in a few seconds. The tokenizer is not read here
(presets ship theirs); `read_llama_gguf` returns the config and the weights under HF names.

    model = load_llama_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # LlamaForCausalLM, float32, eval
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

# llama.cpp's tensor names -> HF Llama's (per layer: "blk.{i}.NAME" -> "model.layers.{i}.NAME").
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part not in LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{suffix}"
    if stem not in GLOBAL_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
    return f"{GLOBAL_NAMES[stem]}.{suffix}"


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows ([out, in], `heads` heads).

    llama.cpp stores each head's rotary dimensions interleaved (pairs x0 x1 x0 x1 ...), HF Llama as
    two halves (`rotate_half`); the converter reorders the rows of q_proj and k_proj accordingly.
    """
    out, width = weight.shape
    return weight.reshape(heads, out // heads // 2, 2, width).swapaxes(1, 2).reshape(out, width)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_llama_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """The Llama config from the file's metadata and every weight dequantized to float32, under HF names."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path} holds a {arch!r} model; read_llama_gguf reads Llama-architecture files only")
    if _field(reader, "llama.rope.scaling.type", "none") not in ("none", None):
        raise NotImplementedError(f"{path} uses RoPE scaling, which read_llama_gguf does not map yet")
    heads = _field(reader, "llama.attention.head_count")
    kv_heads = _field(reader, "llama.attention.head_count_kv", heads)
    weights = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        array = dequantize(tensor.data, tensor.tensor_type)  # [out, in] for matrices, as torch stores them
        if name.endswith("q_proj.weight"):
            array = unpermute_rotary(array, heads)
        elif name.endswith("k_proj.weight"):
            array = unpermute_rotary(array, kv_heads)
        if not array.flags.writeable:  # float tensors come straight from the memory-mapped file
            array = array.copy()
        weights[name] = torch.from_numpy(array.astype(np.float32, copy=False))
    hidden = _field(reader, "llama.embedding_length")
    config = LlamaConfig(
        vocab_size=weights["model.embed_tokens.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_hidden_layers=_field(reader, "llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_field(reader, "llama.rope.dimension_count", hidden // heads),
        max_position_embeddings=_field(reader, "llama.context_length"),
        rms_norm_eps=_field(reader, "llama.attention.layer_norm_rms_epsilon"),
        rope_theta=_field(reader, "llama.rope.freq_base", 10_000.0),
        tie_word_embeddings="lm_head.weight" not in weights,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    return config, weights


def load_llama_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` (eval mode) holding the GGUF file's weights, dequantized."""
    config, weights = read_llama_gguf(path)
    with no_init_weights():  # every weight is overwritten next: skip initialising them
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{path}: weights do not fit the Llama config (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.to(dtype).eval()
