"""Official MemoryLLM checkpoints (SPEC §6): load, read, write, assign, save back, reload.

The official folder is built here the way the original code builds its model: a plain
`LlamaForCausalLM` whose decoder gets PEFT adapters `default` and `decoder_adapter` through
`get_peft_model`, plus `memory`, `initialized`, `bos_embedding`, `new_memory_positional_emb`.
The expected numbers come from the slow reference run on that object, not on latentmem's model.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from latentmem import MemoryLLM

from conftest import LORA, SMALL, random_ids
from reference import reference_greedy, reference_logits, reference_new_slots

K, BLOCKS = 8, 4
N = K * BLOCKS


def build_official(folder, lora=True, initialized=1, rope_scaling=None, seed=0):
    """Write an official-layout folder; return the reference-side objects used to check it."""
    torch.manual_seed(seed)
    llama = LlamaConfig(**SMALL, rope_scaling=rope_scaling)
    base = LlamaForCausalLM(llama).eval()
    if lora:
        peft_config = LoraConfig(inference_mode=True, **LORA)
        get_peft_model(base.model, peft_config)
        get_peft_model(base.model, peft_config, adapter_name="decoder_adapter")
        with torch.no_grad():
            for name, p in base.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
    L, d = llama.num_hidden_layers, llama.hidden_size
    extra = {
        "memory": torch.randn(L, N, d),
        "initialized": torch.tensor(initialized, dtype=torch.uint8),
        "bos_embedding": torch.randn(L, 1, d) * 0.1,
        "new_memory_positional_emb": torch.randn(1, 1, d) * 0.1,
    }
    tensors = {k: v.contiguous() for k, v in base.state_dict().items()} | extra
    save_file(tensors, folder / "model.safetensors")
    config = llama.to_dict() | {
        "architectures": ["MemoryLLM"],
        "num_tokens": K,
        "num_blocks": BLOCKS,
        "num_memory_tokens": N,
        "add_bos_embedding": True,
        "drop_memory_per_layer": False,
        "add_decoder_lora": lora,
        "lora_config": {**LORA, "inference_mode": True} if lora else None,
    }
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    (folder / "config.json").write_text(json.dumps(config))
    ref = SimpleNamespace(
        backbone=base,
        config=SimpleNamespace(num_tokens=K),
        bos_embedding=extra["bos_embedding"],
        new_memory_positional_emb=extra["new_memory_positional_emb"],
    )
    return ref, extra["memory"]


def test_a_folder_saved_by_the_release_names_its_own_model_type(tmp_path):
    """The release's config class saves `model_type: memoryllm`, which transformers does not know."""
    ref, pool = build_official(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "memoryllm"}))
    model = MemoryLLM.from_pretrained(tmp_path)
    ids = random_ids(6)
    assert model.backbone.config.model_type == "llama"
    torch.testing.assert_close(
        model(ids, memory=model.initial_memory()).logits, reference_logits(ref, pool, ids), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("rope_scaling", [None, {"type": "linear", "factor": 2.0}])
def test_official_checkpoint_reads_its_memory_like_the_reference(tmp_path, rope_scaling):
    ref, pool = build_official(tmp_path, rope_scaling=rope_scaling)
    model = MemoryLLM.from_pretrained(tmp_path)
    memory = model.initial_memory()
    assert torch.equal(memory.stm, pool)
    ids = random_ids(9, seed=2)
    torch.testing.assert_close(model(ids, memory=memory).logits, reference_logits(ref, pool, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [40, 10])
def test_official_checkpoint_injection_writes_reference_slots(tmp_path, n):
    ref, pool = build_official(tmp_path)
    model = MemoryLLM.from_pretrained(tmp_path)
    memory = model.initial_memory()
    ids = random_ids(n, seed=n)
    model.inject(memory, input_ids=ids, allow_short=True)
    want = reference_new_slots(ref, pool, ids, adapter="default")
    torch.testing.assert_close(memory.stm[:, -K:], want, atol=1e-4, rtol=0)


def test_assigned_pool_gives_reference_logits_and_greedy_text(tmp_path):
    ref, _ = build_official(tmp_path)
    model = MemoryLLM.from_pretrained(tmp_path)
    memory = model.initial_memory()
    given = torch.randn(memory.shape, generator=torch.Generator().manual_seed(9))
    memory.stm = given
    ids = random_ids(7, seed=3)
    torch.testing.assert_close(model(ids, memory=memory).logits, reference_logits(ref, given, ids), atol=1e-4, rtol=0)
    out = model.generate(ids, memory=memory, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, reference_greedy(ref, given, ids, steps=8))


def test_uninitialized_checkpoint_starts_with_empty_memory(tmp_path):
    ref, _ = build_official(tmp_path, initialized=0)
    model = MemoryLLM.from_pretrained(tmp_path)
    memory = model.initial_memory()
    assert not memory.initialized
    ids = random_ids(6)
    torch.testing.assert_close(model(ids, memory=memory).logits, reference_logits(ref, None, ids), atol=1e-4, rtol=0)


def test_checkpoint_without_lora_uses_plain_projections(tmp_path):
    ref, pool = build_official(tmp_path, lora=False)
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(tmp_path / "model.safetensors")
    model = MemoryLLM.from_pretrained(tmp_path)
    ids = random_ids(6)
    got = model(ids, memory=model.initial_memory()).logits
    torch.testing.assert_close(got, reference_logits(ref, pool, ids, adapter=None), atol=1e-4, rtol=0)


def test_official_round_trip_writes_the_same_tensors_and_fields(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    build_official(src)
    model = MemoryLLM.from_pretrained(src)
    model.save_pretrained(dst, layout="official", memory=model.initial_memory())
    original, written = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    assert original.keys() == written.keys()
    for key in original:
        assert torch.equal(original[key], written[key]), key
    config_in, config_out = (json.loads((f / "config.json").read_text()) for f in (src, dst))
    for field in ("architectures", "num_tokens", "num_blocks", "num_memory_tokens", "add_bos_embedding",
                  "drop_memory_per_layer", "add_decoder_lora", "hidden_size", "num_hidden_layers"):
        assert config_in[field] == config_out[field], field
    assert config_out["lora_config"]["r"] == LORA["r"]
    again = MemoryLLM.from_pretrained(dst)
    ids = random_ids(5)
    assert torch.equal(model(ids, memory=model.initial_memory()).logits, again(ids, memory=again.initial_memory()).logits)


def test_injected_memory_is_saved_in_official_layout(tmp_path):
    (tmp_path / "src").mkdir()
    build_official(tmp_path / "src")
    model = MemoryLLM.from_pretrained(tmp_path / "src")
    memory = model.initial_memory()
    model.inject(memory, input_ids=random_ids(30))
    model.save_pretrained(tmp_path / "dst", layout="official", memory=memory)
    assert torch.equal(MemoryLLM.from_pretrained(tmp_path / "dst").initial_memory().stm, memory.stm)


def test_native_round_trip_keeps_weights_and_leaves_memory_out(tmp_path):
    (tmp_path / "src").mkdir()
    build_official(tmp_path / "src")
    model = MemoryLLM.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "native")
    tensors = load_file(tmp_path / "native" / "model.safetensors")
    assert "memory" not in tensors and "model.layers.0.self_attn.q_proj.lora_A.decoder_adapter.weight" in tensors
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == "latentmem_memoryllm"
    again = MemoryLLM.from_pretrained(tmp_path / "native")
    memory = model.initial_memory()
    ids = random_ids(5)
    assert torch.equal(model(ids, memory=memory).logits, again(ids, memory=memory).logits)
    with pytest.raises(ValueError, match="memory.save"):
        model.save_pretrained(tmp_path / "x", memory=memory)


def test_sharded_checkpoint_loads(tmp_path):
    ref, pool = build_official(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = MemoryLLM.from_pretrained(tmp_path)
    ids = random_ids(5)
    torch.testing.assert_close(model(ids, memory=model.initial_memory()).logits, reference_logits(ref, pool, ids), atol=1e-4, rtol=0)


def test_incomplete_or_foreign_checkpoint_is_refused_clearly(tmp_path):
    build_official(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.base_layer.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        MemoryLLM.from_pretrained(tmp_path)
    tensors["model.layers.1.mlp.up_proj.base_layer.weight"] = torch.zeros(96, 64)
    tensors["vision_tower.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="vision_tower"):
        MemoryLLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MemoryLLM.from_pretrained(tmp_path / "nowhere")


def test_transformers_style_arguments_and_generation_config_are_honoured(tmp_path):
    build_official(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5, "bos_token_id": 1}))
    model = MemoryLLM.from_pretrained(
        tmp_path, torch_dtype=torch.float64, device_map="cpu", low_cpu_mem_usage=True, attn_implementation="eager"
    )
    assert model.dtype == torch.float64 and model.generation_config.eos_token_id == 5
    assert model.backbone.config._attn_implementation == "eager"
    ids = random_ids(5)
    assert model(ids, memory=model.initial_memory()).logits.dtype == torch.float64
