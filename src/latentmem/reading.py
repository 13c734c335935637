"""Reading from memory (docs/design.md, Reading): the memory prefix every query attends to.

For every layer l the input is [bos_l ; STM_l (N slots) ; prompt], positions 0, 1..N, N+1.. in the
release's layout (`positions.py` has layouts that keep old writes near the prompt).
Memory positions supply keys/values only, and those depend on the state and the weights, never on
the prompt. So they are computed once per memory version (`MemoryPrefix`), kept in a
`PrefixCache`, and copied into the transformers `Cache` that the backbone then extends with the
prompt and every generated token, exactly as if the memory were earlier tokens.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from .positions import prompt_start, slot_positions
from .prefix import prefix_keys_values
from .state import MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM


# Room left after the memory prefix for a prompt and its generated tokens, so they are written
# in place instead of copying the whole cache on every step (longer reads fall back to copying).
SPARE_POSITIONS = 512


class MemoryPrefix:
    """Per-layer keys and values of [bos ; STM], positions 0..P-1 (P = 0 for empty memory).

    Each layer's tensors live at the front of a buffer with `SPARE_POSITIONS` free positions behind
    them. One read at a time may borrow the buffers (`seed`): its prompt and generated tokens are
    then written into the free positions in place, so neither the prefix nor the growing cache is
    copied per call or per token. A read that cannot borrow them (another read's cache still
    alive, a batch of prompts, an inference-mode mismatch) gets copies, as a plain cache would.
    """

    def __init__(
        self,
        keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        spare: int = 0,
        prompt_start: int | None = None,
    ):
        self.length = keys_values[0][0].shape[2] if keys_values else 0
        # RoPE position of the prompt's first token: right after the prefix unless the layout says otherwise
        self.prompt_start = self.length if prompt_start is None else prompt_start
        self.buffers = [_with_room(k, v, spare) for k, v in keys_values or []]
        self._borrower: weakref.ref | None = None
        self._lock = threading.Lock()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's prefix keys and values (views into its buffers)."""
        keys, values = self.buffers[i]
        return keys[:, :, : self.length], values[:, :, : self.length]

    @property
    def keys_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(len(self.buffers))]

    def seed(self, cache: Cache, batch_size: int) -> None:
        """Put the prefix into an empty `cache`, shared by `batch_size` prompts."""
        layers = [cache.layers[i] if i < len(cache.layers) else None for i in range(len(self.buffers))]
        with self._lock:  # two threads reading one state must not borrow the same buffers
            lend = (
                batch_size == 1
                and (self._borrower is None or self._borrower() is None)
                and all(type(layer) is DynamicLayer and not layer.is_initialized for layer in layers)
                and all(k.shape[2] > self.length for k, _ in self.buffers)
                # in-place writes into inference-mode tensors are only allowed in inference mode
                and all(torch.is_inference_mode_enabled() or not k.is_inference() for k, _ in self.buffers)
            )
            if lend:
                self._borrower = weakref.ref(cache)
        for i, (keys, values) in enumerate(self.buffers):
            if lend:
                cache.layers[i] = PrefixedLayer(keys, values, self.length)
            else:
                keys, values = keys[:, :, : self.length], values[:, :, : self.length]
                cache.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1), i)


def _with_room(keys: torch.Tensor, values: torch.Tensor, spare: int) -> tuple[torch.Tensor, torch.Tensor]:
    if spare == 0:
        return keys, values
    shape = (*keys.shape[:2], keys.shape[2] + spare, keys.shape[3])
    room_k, room_v = keys.new_empty(shape), values.new_empty(shape)
    room_k[:, :, : keys.shape[2]], room_v[:, :, : keys.shape[2]] = keys, values
    return room_k, room_v


class PrefixedLayer(DynamicLayer):
    """A `DynamicLayer` that starts as the memory prefix and grows in place in the buffer's free room.

    It behaves exactly like a `DynamicLayer` (same keys/values, same lengths); once the room is
    used up, or its tensors were replaced (beam reordering), it falls back to concatenation.
    """

    def __init__(self, keys_buffer: torch.Tensor, values_buffer: torch.Tensor, length: int):
        super().__init__()
        self.lazy_initialization(keys_buffer, values_buffer)
        self.keys_buffer, self.values_buffer = keys_buffer, values_buffer
        self.keys, self.values = keys_buffer[:, :, :length], values_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
        in_buffer = self.keys_buffer is not None and self.keys.data_ptr() == self.keys_buffer.data_ptr()
        if in_buffer and end <= self.keys_buffer.shape[2] and key_states.shape[0] == self.keys.shape[0]:
            self.keys_buffer[:, :, start:end] = key_states
            self.values_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.keys_buffer[:, :, :end], self.values_buffer[:, :, :end]
            return self.keys, self.values
        self.keys_buffer = self.values_buffer = None  # from here on, an ordinary DynamicLayer
        return super().update(key_states, value_states, *args, **kwargs)


def compute_memory_prefix(
    model: "MemoryLLM",
    slots: torch.Tensor | None,
    spare: int = 0,
    start: int = 0,
    with_bos: bool = True,
    gap: tuple[int, int] | None = None,
    sources: torch.Tensor | None = None,
) -> MemoryPrefix:
    """Project [bos_l ; slots_l] through every layer's norm, k/v projections and RoPE.

    `slots` is a pool `[L, M, d]`, or None for memory with nothing written yet: then the model reads
    without memory (and without bos), as the original does. Positions follow the model's
    `memory_positions` layout: in "pool" order bos at `start` and slots after it; `sources [L, M]`
    (the injection id of every slot; None: one write) places slots in the other layouts. M+ puts
    retrieved slots among the short-term ones, so it asks for the short-term part alone
    (`with_bos=False`) with a `gap` `(at, size)`: in pool order, slots from index `at` on sit `size`
    positions further, leaving room for them.
    """
    if slots is None:
        return MemoryPrefix()
    decoder, scheme, K = model.decoder, model.config.memory_positions, model.config.num_tokens
    vectors = slots.to(model.dtype)
    L, M = vectors.shape[:2]
    if sources is None:
        sources = torch.zeros(L, M, dtype=torch.long)
    positions = slot_positions(scheme, sources.to(vectors.device), K, first=start + 1).clone()  # [L, M]
    if scheme == "pool" and not (with_bos and model.bos_embedding is not None):
        positions -= 1  # no bos in front: slots start at `start` itself
    if gap is not None and scheme == "pool":
        positions[:, gap[0] :] += gap[1]
    if with_bos and model.bos_embedding is not None:
        vectors = torch.cat([model.bos_embedding.to(vectors.dtype), vectors], dim=1)
        positions = torch.cat([torch.full_like(positions[:, :1], start), positions], dim=1)
    last = int(positions.max()) if positions.numel() else start
    rope = decoder.rotary_emb(vectors, position_ids=positions)  # ([L, P, head_dim], ...): one row per layer
    keys_values = [
        prefix_keys_values(layer, vectors[i : i + 1], tuple(part[i : i + 1] for part in rope))
        for i, layer in enumerate(decoder.layers)
    ]
    return MemoryPrefix(keys_values, spare=spare, prompt_start=prompt_start(scheme, last + 1, K))


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
        self._lock = threading.Lock()  # a server reads different states from several threads

    def get(
        self, model: "MemoryLLM", state: MemoryState, start: int = 0, with_bos: bool = True, gap: tuple | None = None
    ) -> MemoryPrefix:
        if model.config.memory_positions != "pool":
            gap = None  # slots sit by write, not by index: where retrieved slots go moves none of them
        key = (state.version, model.adapters.active, model.dtype, start, with_bos, gap)
        with self._lock:
            entry = self._entries.get(state)
        if entry is not None and entry[0] == key:
            return entry[1]
        with torch.no_grad():
            slots = state.stm if state.initialized else None
            prefix = compute_memory_prefix(model, slots, SPARE_POSITIONS, start, with_bos, gap, state.sources)
        with self._lock:
            self._entries[state] = (key, prefix)
        return prefix

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
