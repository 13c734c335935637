"""A tour of the memory mechanics on a tiny model built in code (no download, a few seconds).

Until trained default weights ship, the demo model is randomly initialised: it shows how memory
is written, read, forgotten and persisted, not what a trained model recalls.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from .modeling import MemoryLLM
from .models import untrained_model
from .state import MemoryState


def run_demo(model: MemoryLLM | None = None, tokenizer=None, distractors: int = 40, echo=print) -> MemoryState:
    """Run the tour on `model` and its tokenizer (default: `latentmem.models.untrained_model()`)."""
    if model is None:
        model, tokenizer = untrained_model()

    def write(text: str, source: str = ""):
        return model.inject(memory, text=text, tokenizer=tokenizer, source=source)

    K, N = model.config.num_tokens, model.config.memory_size
    memory = model.new_memory(seed=0)
    # The first write into an empty pool fills all of it (tiling); start from a filled pool so the
    # story is an ordinary write of K slots.
    write("The harbour archive opens at nine and closes at five each day.")
    story = "Mira keeps the spare key of the lighthouse under the third blue stone by the gate."
    result = write(story, source="story")
    echo(f"wrote the story: {result.tokens} tokens -> {result.slots_written} new slots in each of "
         f"{memory.num_layers} layers (pool: {N} slots/layer, {K} per write)")
    echo(f"a slot survives t later writes with probability (1 - {K}/{N})^t; half-life ~{0.69 * N / K:.0f} writes")
    for i in range(1, distractors + 1):
        write(f"Distractor note {i}: the weather on day {i} was mild and dry.", source=f"distractor-{i}")
        if i in (1, 5, 10, 20, 40) or i == distractors:
            left = memory.surviving_slots().get(result.injection_id, 0) / memory.num_layers
            echo(f"after {i:>3} distractors: {left:5.1f} of the story's slots per layer remain "
                 f"(expected {K * (1 - K / N) ** i:5.1f})")  # fmt: skip
    prompt = tokenizer("The spare key is", add_special_tokens=False, return_tensors="pt").input_ids
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
