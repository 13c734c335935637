"""A tour of the memory mechanics on a tiny model built in code (no download, a few seconds).

Until trained default weights ship, the demo model is randomly initialised: it shows how memory
is written, read, forgotten and persisted, not what a trained model recalls.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig

from .config import DEFAULT_LORA, MemoryLLMConfig
from .modeling import MemoryLLM
from .state import MemoryState


def tiny_model(seed: int = 0) -> MemoryLLM:
    """A 4-layer, d=128 Llama with a 16 x 32-slot pool per layer and both LoRA adapters."""
    torch.manual_seed(seed)
    backbone = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    config = MemoryLLMConfig(backbone_config=backbone, num_tokens=32, num_blocks=16, lora=DEFAULT_LORA)
    return MemoryLLM(config).eval()


def byte_ids(text: str) -> torch.Tensor:
    """The demo model's tokenizer: one token per byte."""
    return torch.tensor(list(text.encode("utf-8")))


def run_demo(model: MemoryLLM | None = None, distractors: int = 40, echo=print) -> MemoryState:
    model = model or tiny_model()
    K, N = model.config.num_tokens, model.config.memory_size
    memory = model.new_memory(seed=0)
    # The first write into an empty pool fills all of it (tiling); start from a filled pool so the
    # story is an ordinary write of K slots.
    model.inject(memory, input_ids=byte_ids("The harbour archive opens at nine and closes at five each day."))
    story = "Mira keeps the spare key of the lighthouse under the third blue stone by the gate."
    result = model.inject(memory, input_ids=byte_ids(story), source="story")
    echo(f"wrote the story: {result.tokens} tokens -> {result.slots_written} new slots in each of "
         f"{memory.num_layers} layers (pool: {N} slots/layer, {K} per write)")
    echo(f"a slot survives t later writes with probability (1 - {K}/{N})^t; half-life ~{0.69 * N / K:.0f} writes")
    for i in range(1, distractors + 1):
        model.inject(memory, input_ids=byte_ids(f"Distractor note {i}: the weather on day {i} was mild and dry."),
                     source=f"distractor-{i}")  # fmt: skip
        if i in (1, 5, 10, 20, 40) or i == distractors:
            left = memory.surviving_slots().get(result.injection_id, 0) / memory.num_layers
            echo(f"after {i:>3} distractors: {left:5.1f} of the story's slots per layer remain "
                 f"(expected {K * (1 - K / N) ** i:5.1f})")  # fmt: skip
    prompt = byte_ids("The spare key is")[None]
    with torch.inference_mode():
        out = model.generate(prompt, memory=memory, max_new_tokens=12, do_sample=False)
    echo(f"greedy continuation read from memory (random weights, so no real recall): {out[0, prompt.shape[1]:].tolist()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.safetensors"
        memory.save(path)
        loaded = MemoryState.load(path, model)
        same = torch.equal(loaded.stm, memory.stm)
        echo(f"saved and reloaded the memory ({path.stat().st_size / 1e6:.1f} MB): identical = {same}")
    return memory
