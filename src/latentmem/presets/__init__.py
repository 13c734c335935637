"""Trained default models shipped with latentmem.

    from latentmem.presets import load_preset
    model, tokenizer = load_preset("tiny")        # ~1M-parameter Llama trained here, a few MB, offline
    memory = model.new_memory()
    model.inject(memory, text="Ada Quorn was born in Velkholm.", tokenizer=tokenizer, allow_short=True)

Each preset is a latentmem model folder (`save_pretrained`, native layout) with its tokenizer
files, under this package. Retrain one with `latentmem train --preset NAME`
(`latentmem.training.train_preset`).
"""

from __future__ import annotations

from pathlib import Path

import torch

PRESETS_DIR = Path(__file__).parent
SHIPPED = ("tiny",)
# Presets on a pretrained base ship only their memory adapter (LoRA + embeddings), not the base.
ADAPTER_PRESETS = ("smollm2-135m",)


def preset_path(name: str) -> Path:
    """The folder of a shipped preset."""
    if name not in SHIPPED and name in ADAPTER_PRESETS and (PRESETS_DIR / name).is_dir():
        return PRESETS_DIR / name
    if name not in SHIPPED:
        hint = " (train it: latentmem train --preset smollm2-135m)" if name == "smollm2-135m" else ""
        raise KeyError(f"no shipped preset {name!r}{hint}; shipped: {list(SHIPPED)}")
    folder = PRESETS_DIR / name
    if not (folder / "model.safetensors").exists():
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
