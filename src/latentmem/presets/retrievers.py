"""M+ from a MemoryLLM: fresh retrievers (`mplus_from`) or saved ones (`mplus_with_retrievers`).

An M+ preset on a pretrained base ships only its retrievers: a safetensors file whose header
records the M+ fields that shape them, so the MemoryLLM they were trained on plus this file
rebuild the M+. `latentmem.training.retriever.save_retrievers` writes one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import MPlusConfig
from ..modeling import MemoryLLM
from ..mplus import MPlus

RETRIEVER_FILE = "retriever.safetensors"
# The M+ fields a retriever file records: with the MemoryLLM it was trained on, they rebuild its M+.
RETRIEVER_FIELDS = ("num_blocks", "num_ltm_blocks", "selector_hidden_dim", "num_selector_layers",
                    "retrieved_slots_position")  # fmt: skip
# How the M+ chooses what it reads; files written before these fields existed read as the defaults.
OPTIONAL_RETRIEVER_FIELDS = {"retrieval_unit": "slot", "write_ranking": "per_layer", "focused_writes": 0}
# latentmem never uses the retrievers' encoder_query_proj (it exists to load the release's checkpoints).
UNUSED_RETRIEVER_PART = ".encoder_query_proj."


def mplus_from(model: MemoryLLM, seed: int = 0, **ltm_config) -> MPlus:
    """An M+ holding `model`'s weights and fresh retrievers (initialised from `seed`).

    `ltm_config`: `MPlusConfig` fields. Of the `num_blocks` blocks a read attends to,
    `num_ltm_blocks` then come from long-term memory, so M+ reads as many slots as `model` does.
    """
    fields = model.config.to_dict()
    # focused reads rank writes differently in M+ (its token index): they are the M+'s own choice
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "focused_writes"):
        fields.pop(key, None)
    with torch.random.fork_rng(devices=[]):  # seeded retrievers without touching the caller's RNG
        torch.manual_seed(seed)
        mplus = MPlus(MPlusConfig(**{**fields, **ltm_config}))
    mplus = mplus.to(device=model.device, dtype=model.dtype)
    missing, unexpected = mplus.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not key.startswith("retrievers.") for key in missing):
        raise ValueError(f"weights do not fit the M+ model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    mplus.generation_config = model.generation_config
    return mplus.eval()


def retriever_config(folder: str | Path) -> dict:
    """The M+ fields a saved retriever file was trained with, read from its header alone."""
    from safetensors import safe_open

    path = Path(folder) / RETRIEVER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RETRIEVER_FILE} in {folder} (save one with save_retrievers)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    missing = [k for k in RETRIEVER_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the M+ fields {missing} in its header (not written by save_retrievers?)")
    fields = {k: meta[k] if k == "retrieved_slots_position" else int(meta[k]) for k in RETRIEVER_FIELDS}
    optional = {k: type(default)(meta.get(k, default)) for k, default in OPTIONAL_RETRIEVER_FIELDS.items()}
    return fields | optional


def mplus_with_retrievers(model: MemoryLLM, folder: str | Path) -> MPlus:
    """`model` (the MemoryLLM the retrievers were trained on) as an M+ with the retrievers saved in `folder`."""
    from safetensors.torch import load_file

    mplus = mplus_from(model, **retriever_config(folder))
    load_retrievers(mplus, load_file(Path(folder) / RETRIEVER_FILE))
    return mplus


def load_retrievers(model: MPlus, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved retriever weights into `model`: every one it uses (`encoder_query_proj` may be absent)."""
    missing, unexpected = model.retrievers.load_state_dict(tensors, strict=False)  # cast to the model's dtype
    if unexpected or any(UNUSED_RETRIEVER_PART not in name for name in missing):
        raise ValueError(f"retriever weights do not fit this M+ (missing {missing[:3]}, unexpected {unexpected[:3]})")
