"""GGUF reading (`latentmem.gguf_weights`) against transformers' own GGUF loader, on a tiny file made here."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

gguf = pytest.importorskip("gguf")

from latentmem.gguf_weights import (
    GLOBAL_NAMES,
    LAYER_NAMES,
    hf_name,
    load_llama_gguf,
    read_llama_gguf,
    unpermute_rotary,
)

CONFIG = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# The writer inverts the reader's name maps; the comparison with transformers' loader checks both.
TO_GGUF = {hf: name for name, hf in GLOBAL_NAMES.items()}
GGUF_PARTS = {hf: name for name, hf in LAYER_NAMES.items()}


def permute_like_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's HF converter does to q/k rows: each head's two rotary halves interleaved."""
    out, width = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, width).swapaxes(1, 2).reshape(out, width)


def gguf_name(name: str) -> str:
    stem, suffix = name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        layer, part = stem.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{GGUF_PARTS[part]}.{suffix}"
    return f"{TO_GGUF[stem]}.{suffix}"


def write_gguf(model: LlamaForCausalLM, path, quant=gguf.GGMLQuantizationType.Q8_0) -> None:
    """The model as llama.cpp's converter writes a Llama: metadata, permuted q/k, matrices quantized."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_pad_token_id(c.pad_token_id)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: llama.cpp stores the embedding only
            continue
        array = tensor.numpy()
        if name.endswith("q_proj.weight"):
            array = permute_like_llama_cpp(array, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = permute_like_llama_cpp(array, c.num_key_value_heads)
        if array.ndim == 2:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    write_gguf(LlamaForCausalLM(LlamaConfig(**CONFIG)), path)
    return path


def test_weights_and_logits_match_transformers_gguf_loading(gguf_file):
    ours = load_llama_gguf(gguf_file)
    theirs = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 5, 17, 42, 9]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs.eval()(ids).logits)


def test_config_comes_from_the_metadata(gguf_file):
    config, weights = read_llama_gguf(gguf_file)
    for key, value in CONFIG.items():
        assert getattr(config, key) == pytest.approx(value), key  # metadata holds float32
    assert "lm_head.weight" not in weights  # tied: the embedding serves as the output layer


def test_rotary_unpermute_inverts_llama_cpp_order():
    weight = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    assert np.array_equal(unpermute_rotary(permute_like_llama_cpp(weight, 2), 2), weight)


def test_unknown_tensor_names_and_architectures_are_refused(tmp_path):
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="no Llama counterpart"):
        hf_name("blk.0.attn_qkv.weight")
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="Llama-architecture"):
        read_llama_gguf(tmp_path / "gpt2.gguf")
