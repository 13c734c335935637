"""Reading from memory (SPEC §3): the memory prefix every query attends to.

For every layer l the input is [bos_l ; STM_l (N slots) ; prompt], positions 0, 1..N, N+1.. .
Memory positions supply keys/values only, and those depend on the state and the weights, never on
the prompt. So they are computed once per memory version (`MemoryPrefix`), kept in a
`PrefixCache`, and copied into the transformers `Cache` that the backbone then extends with the
prompt and every generated token, exactly as if the memory were earlier tokens.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import Cache

from .prefix import prefix_keys_values, rotary_embeddings
from .state import MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM


@dataclass
class MemoryPrefix:
    """Per-layer keys and values `[1, kv_heads, P, head_dim]` of [bos ; STM]; P = 0 for empty memory."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys_values[0][0].shape[2] if self.keys_values else 0

    def seed(self, cache: Cache, batch_size: int) -> None:
        """Put the prefix into an empty `cache`, shared by `batch_size` prompts."""
        for i, (keys, values) in enumerate(self.keys_values):
            cache.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1), i)


def compute_memory_prefix(model: "MemoryLLM", state: MemoryState) -> MemoryPrefix:
    """Project [bos_l ; STM_l] through every layer's norm, k/v projections and RoPE (positions 0..P-1)."""
    if not state.initialized:
        # Nothing written yet: the model reads without memory (and without bos), as the original does.
        return MemoryPrefix()
    decoder = model.decoder
    vectors = state.stm.to(model.dtype)  # [L, N, d]
    if model.bos_embedding is not None:
        vectors = torch.cat([model.bos_embedding.to(vectors.dtype), vectors], dim=1)
    rope = rotary_embeddings(decoder.rotary_emb, vectors, 0, vectors.shape[1])
    return MemoryPrefix(
        [prefix_keys_values(layer, vectors[i : i + 1], rope) for i, layer in enumerate(decoder.layers)]
    )


class PrefixCache:
    """Memory prefixes of the states a model has read, recomputed only when something changed.

    An entry is valid for one (state version, active adapter) pair; states are held weakly, so a
    dropped state frees its prefix. Training changes weights, so the model clears this cache
    whenever it switches between train and eval mode.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[MemoryState, tuple[tuple, MemoryPrefix]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, model: "MemoryLLM", state: MemoryState) -> MemoryPrefix:
        key = (state.version, model.adapters.active, model.dtype)
        entry = self._entries.get(state)
        if entry is not None and entry[0] == key:
            return entry[1]
        with torch.no_grad():
            prefix = compute_memory_prefix(model, state)
        self._entries[state] = (key, prefix)
        return prefix

    def clear(self) -> None:
        self._entries.clear()
