"""Tiny random backbones built in code: every test runs offline in seconds."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from latentmem import MemoryLLM, MemoryLLMConfig

LORA = dict(
    r=4, lora_alpha=8, lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "gate_proj"],
)  # fmt: skip
SMALL = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
)  # fmt: skip


def backbone_config(family: str = "llama", **overrides):
    fields = {**SMALL, **overrides}
    if family == "llama":
        return LlamaConfig(**fields)
    if family == "llama-linear-rope":
        return LlamaConfig(rope_scaling={"type": "linear", "factor": 2.0}, **fields)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **fields)
    if family == "qwen2":
        return Qwen2Config(**fields)  # q/k/v projections carry biases
    raise ValueError(family)


def randomize_lora(model: MemoryLLM, seed: int = 0) -> None:
    """LoRA B starts at zero (adapters are no-ops); give both adapters distinct, visible effects."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "bos_embedding" in name or "new_memory_positional_emb" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_model(
    family: str = "llama",
    num_tokens: int = 8,
    num_blocks: int = 4,
    lora: dict | None = LORA,
    seed: int = 0,
    **config_overrides,
) -> MemoryLLM:
    torch.manual_seed(seed)
    config = MemoryLLMConfig(
        backbone_config=backbone_config(family),
        num_tokens=num_tokens,
        num_blocks=num_blocks,
        lora=lora,
        **config_overrides,
    )
    model = MemoryLLM(config).eval()
    randomize_lora(model, seed)
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices on shared cores: a second torch thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> MemoryLLM:
    return make_model()


def random_ids(n: int, seed: int = 0, vocab: int = SMALL["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def written(monkeypatch, tiny):
    """The text of every write the module's `tiny` model receives (each test module defines `tiny`)."""
    model, tokenizer = tiny
    texts: list[str] = []
    inject = model.inject

    def spy(state, input_ids=None, **kwargs):
        texts.append(tokenizer.decode(input_ids))
        return inject(state, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "inject", spy)
    return texts
