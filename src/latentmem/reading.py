"""Reading from memory (docs/design.md, Reading): the memory prefix every query attends to.

For every layer l the input is [bos_l ; STM_l (N slots) ; prompt], positions 0, 1..N, N+1.. in the
release's layout (`positions.py` has layouts that keep old writes near the prompt).
Memory positions supply keys/values only, and those depend on the state and the weights, never on
the prompt. So they are computed once per memory version (`MemoryPrefix`), kept in a
`PrefixCache`, and copied into the transformers `Cache` that the backbone then extends with the
prompt and every generated token, exactly as if the memory were earlier tokens.

A write changes only K of a layer's N slots; the others keep their vectors and at most move. So
the cache keeps every slot's key before RoPE next to its value, and the next version projects only
the slots written since, gathers the kept ones and rotates all keys to their (new) positions: exact
in every `memory_positions` layout, since a key before RoPE depends on the slot alone.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import TYPE_CHECKING

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from .positions import prompt_start, slot_positions
from .prefix import prefix_keys_values, rotate_keys_into, unrotated_keys_values
from .state import MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM


# Room left after the memory prefix for a prompt and its generated tokens, so they are written
# in place instead of copying the whole cache on every step (longer reads fall back to copying).
SPARE_POSITIONS = 512
# Slots rotated at once when a cached prefix is (re)built: bounds the temporaries of RoPE.
ROTATE_CHUNK = 1024


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
        # keys of the slots before RoPE, per layer (bos excluded), and the RoPE positions `[L, P]` of
        # [bos ; slots]: kept by the cache for the next version
        self.raw_keys: list[torch.Tensor] = []
        self.num_bos = 0
        self.positions: torch.Tensor | None = None
        self._borrower: weakref.ref | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_buffers(
        cls,
        buffers: list[tuple[torch.Tensor, torch.Tensor]],
        length: int,
        prompt_start: int,
        raw_keys: list[torch.Tensor] | None = None,
        num_bos: int = 0,
        positions: torch.Tensor | None = None,
    ) -> MemoryPrefix:
        """A prefix whose layer i is `buffers[i]`'s first `length` positions (the rest is spare room)."""
        prefix = cls()
        prefix.buffers, prefix.length, prefix.prompt_start = buffers, length, prompt_start
        prefix.raw_keys, prefix.num_bos, prefix.positions = raw_keys or [], num_bos, positions
        return prefix

    @property
    def lent(self) -> bool:
        """Whether a read's cache is still growing inside the buffers."""
        with self._lock:
            return self._borrower is not None and self._borrower() is not None

    def writable(self) -> bool:
        """Whether the buffers may be overwritten here: in-place writes into inference-mode tensors
        are only allowed in inference mode."""
        return torch.is_inference_mode_enabled() or not any(
            k.is_inference() or v.is_inference() for k, v in self.buffers
        )

    def retire(self) -> None:
        """Hand the buffers over to a newer version: this object no longer holds them."""
        self.buffers, self.raw_keys, self.length, self.positions = [], [], 0, None

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


def memory_positions(
    model: MemoryLLM, sources: torch.Tensor, start: int, with_bos: bool, gap: tuple[int, int] | None
) -> tuple[torch.Tensor, int, int]:
    """(RoPE positions `[L, bos + M]` of [bos ; slots], the number of bos entries (0 or 1), the prompt's start).

    `sources [L, M]`: the injection id of every slot (the layouts other than "pool" place by write).
    """
    scheme, K = model.config.memory_positions, model.config.num_tokens
    num_bos = 1 if with_bos and model.bos_embedding is not None else 0
    positions = slot_positions(scheme, sources, K, first=start + 1).clone()  # [L, M]
    if scheme == "pool" and not num_bos:
        positions -= 1  # no bos in front: slots start at `start` itself
    if gap is not None and scheme == "pool":
        positions[:, gap[0] :] += gap[1]
    if num_bos:
        positions = torch.cat([torch.full_like(positions[:, :1], start), positions], dim=1)
    last = int(positions.max()) if positions.numel() else start
    return positions, num_bos, prompt_start(scheme, last + 1, K)


def compute_memory_prefix(
    model: MemoryLLM,
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
    positions further, leaving room for them. Differentiable (training reads fresh slots this way);
    `PrefixCache` keeps the same keys/values per memory version without gradients.
    """
    if slots is None:
        return MemoryPrefix()
    decoder = model.decoder
    vectors = slots.to(model.dtype)
    L, M = vectors.shape[:2]
    if sources is None:
        sources = torch.zeros(L, M, dtype=torch.long)
    positions, num_bos, start_of_prompt = memory_positions(model, sources.to(vectors.device), start, with_bos, gap)
    if num_bos:
        vectors = torch.cat([model.bos_embedding.to(vectors.dtype), vectors], dim=1)
    rope = decoder.rotary_emb(vectors, position_ids=positions)  # ([L, P, head_dim], ...): one row per layer
    if spare and not torch.is_grad_enabled():
        prefix = _project_into_buffers(model, vectors, rope, num_bos, spare, start_of_prompt)
        prefix.positions = positions
        return prefix
    keys_values = [
        prefix_keys_values(layer, vectors[i : i + 1], tuple(part[i : i + 1] for part in rope))
        for i, layer in enumerate(decoder.layers)
    ]
    return MemoryPrefix(keys_values, spare=spare, prompt_start=start_of_prompt)


def _project_into_buffers(
    model: MemoryLLM, vectors: torch.Tensor, rope: tuple, num_bos: int, spare: int, start_of_prompt: int
) -> MemoryPrefix:
    """`compute_memory_prefix` for the cache (no gradients): layer by layer, straight into buffers with
    `spare` room, keeping the slots' keys before RoPE (`MemoryPrefix.raw_keys`) for the next version."""
    cos, sin = rope
    P = vectors.shape[1]
    buffers, raw_keys = [], []
    for i, layer in enumerate(model.decoder.layers):
        raw, values = unrotated_keys_values(layer, vectors[i : i + 1])
        shape = (raw.shape[0], raw.shape[1], P + spare, raw.shape[3])
        keys_buffer, values_buffer = raw.new_empty(shape), raw.new_empty(shape)
        _rotate_into(layer, keys_buffer, raw, cos[i : i + 1], sin[i : i + 1])
        values_buffer[:, :, :P] = values
        kept = raw.new_empty(raw.shape[0], raw.shape[1], P - num_bos, raw.shape[3])
        kept.copy_(raw[:, :, num_bos:])
        del raw, values
        buffers.append((keys_buffer, values_buffer))
        raw_keys.append(kept)
    return MemoryPrefix.from_buffers(buffers, P, start_of_prompt, raw_keys=raw_keys, num_bos=num_bos)


class PrefixCache:
    """Memory prefixes of the states a model has read, rebuilt only as far as something changed.

    An entry is valid for one (state version, read adapter, dtype, layout) tuple; states are held
    weakly, so a dropped state frees its prefix. A write changes only K of a layer's N slots: the
    next read projects those K (norm, k/v projections), takes every other slot's key before RoPE
    and its value from the previous version (`MemoryState.slot_origins`), and rotates the keys to
    their new positions. The stale version's buffers are overwritten in place when nobody else
    holds them (no read still using them, no caller keeping the old `MemoryPrefix`), so a first read
    after a write allocates only per-layer temporaries. Training changes weights, so the model clears
    this cache whenever it switches between train and eval mode.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[MemoryState, tuple[tuple, MemoryPrefix]] = weakref.WeakKeyDictionary()
        self._building: weakref.WeakKeyDictionary[MemoryState, threading.Lock] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # a server reads different states from several threads
        # (positions, dtype, cos, sin) of the last incremental build: "pool" and "fixed" layouts give
        # every version (and every state of a model) the same positions, so RoPE's table is reused
        self._rope: tuple | None = None

    def get(
        self, model: MemoryLLM, state: MemoryState, start: int = 0, with_bos: bool = True, gap: tuple | None = None
    ) -> MemoryPrefix:
        if model.config.memory_positions != "pool":
            gap = None  # slots sit by write, not by index: where retrieved slots go moves none of them
        adapter = model.adapters.adapter_for("read")
        key = (state.version, adapter, model.dtype, start, with_bos, gap)
        with self._lock:
            entry = self._entries.get(state)
            if entry is not None and entry[0] == key:
                return entry[1]
            building = self._building.setdefault(state, threading.Lock())
        with building:  # one build per state at a time; other states build in parallel
            with self._lock:
                entry = self._entries.get(state)
                if entry is not None and entry[0] == key:
                    return entry[1]
                # drop the stale version before building the next: its buffers are reused or freed
                entry = self._entries.pop(state, None)
            prefix = None
            with torch.no_grad(), model.adapters.use("read"):
                if entry is not None and state.initialized and entry[0][1:5] == key[1:5] and entry[1].raw_keys:
                    origins = state.slot_origins(entry[0][0])
                    if origins is not None:
                        prefix = _next_version(model, state, entry, key, origins, self._rope_table)
                if prefix is None:
                    entry = None  # nothing to reuse: free it before allocating the new buffers
                    slots = state.stm if state.initialized else None
                    prefix = compute_memory_prefix(model, slots, SPARE_POSITIONS, start, with_bos, gap, state.sources)
            with self._lock:
                self._entries[state] = (key, prefix)
            return prefix

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._rope = None

    def _rope_table(self, model: MemoryLLM, positions: torch.Tensor, like: torch.Tensor) -> tuple:
        """(cos, sin) `[L, P, head_dim]` of the backbone's RoPE at `positions [L, P]`."""
        with self._lock:
            table = self._rope
        if table is not None and table[1] == like.dtype and torch.equal(table[0], positions):
            return table[2], table[3]
        cos, sin = model.decoder.rotary_emb(like, position_ids=positions)
        with self._lock:
            self._rope = (positions, like.dtype, cos, sin)
        return cos, sin


def _rotate_into(layer, target: torch.Tensor, raw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """`target[:, :, j] = RoPE(raw[:, :, j])` for every j, a chunk of slots at a time (`cos`, `sin`: `[1, T, hd]`)."""
    for s in range(0, raw.shape[2], ROTATE_CHUNK):
        e = min(s + ROTATE_CHUNK, raw.shape[2])
        rotate_keys_into(layer, target[:, :, s:e], raw[:, :, s:e], cos[:, s:e], sin[:, s:e])


def _gather(target: torch.Tensor, source: torch.Tensor, index: torch.Tensor, at: int) -> None:
    """`target[:, :, at + j] = source[:, :, index[j]]`, a chunk of slots at a time.

    Also in place (`target` and `source` one buffer): kept slots only move to lower indices
    (`index[j] >= at + j`), so a chunk never reads what an earlier chunk wrote, and each chunk is
    gathered into a small temporary before it is written.
    """
    for s in range(0, index.numel(), ROTATE_CHUNK):
        chunk = index[s : s + ROTATE_CHUNK]
        target[:, :, at + s : at + s + chunk.numel()] = source.index_select(2, chunk)


def _exclusive(entry: tuple[tuple, MemoryPrefix]) -> bool:
    """Whether nobody but the cache holds `entry`'s prefix: no caller keeps it, no read borrows its buffers."""
    # references: the entry tuple and getrefcount's argument (CPython counts them exactly)
    if sys.getrefcount(entry[1]) > 2:
        return False
    prefix = entry[1]
    if prefix.lent or not prefix.writable():
        return False
    return torch.is_inference_mode_enabled() or not any(raw.is_inference() for raw in prefix.raw_keys)


def _next_version(
    model: MemoryLLM, state: MemoryState, old: tuple[tuple, MemoryPrefix], key: tuple, origins: torch.Tensor, rope_table
) -> MemoryPrefix:
    """The prefix of `state` from the cached one of an earlier version: slots kept since are gathered
    (key before RoPE, value), slots written since are projected, and keys rotated to their positions
    (kept keys whose position did not change, as in the "fixed" layout, are gathered rotated)."""
    _, _, dtype, start, with_bos, gap = key
    in_place = _exclusive(old)
    old_prefix = old[1]
    decoder, B = model.decoder, old_prefix.num_bos
    M = origins.shape[1]
    device = state.device
    positions, _, start_of_prompt = memory_positions(model, state.sources.to(device), start, with_bos, gap)
    cos, sin = rope_table(model, positions, old_prefix.raw_keys[0])  # [L, P, head_dim] each
    old_positions = old_prefix.positions
    identity = torch.arange(M)
    buffers, raw_keys = [], []
    for i, layer in enumerate(decoder.layers):
        old_keys, old_values = old_prefix.buffers[i]
        old_raw = old_prefix.raw_keys[i]
        if in_place:
            keys_buffer, values_buffer, raw = old_keys, old_values, old_raw
        else:
            keys_buffer, values_buffer = torch.empty_like(old_keys), torch.empty_like(old_values)
            raw = torch.empty_like(old_raw)
            if B:  # bos sits where it sat (same `start`)
                keys_buffer[:, :, :B], values_buffer[:, :, :B] = old_keys[:, :, :B], old_values[:, :, :B]
        kept = int((origins[i] >= 0).sum())
        source = origins[i, :kept]
        keys, values = keys_buffer[:, :, B : B + M], values_buffer[:, :, B : B + M]
        unmoved = old_positions is not None and torch.equal(
            positions[i, B : B + kept], old_positions[i, B : B + M][source.to(old_positions.device)]
        )
        # in place, slots before the first one that moved are where they were already
        moved = source != identity[:kept]
        same = int(moved.int().argmax()) if moved.any() else kept
        if not in_place:
            same = 0
        if same < kept:
            index = source[same:].to(device)
            _gather(raw, old_raw, index, same)
            _gather(values, old_values[:, :, B : B + M], index, same)
            if unmoved:
                _gather(keys, old_keys[:, :, B : B + M], index, same)
        if kept < M:
            new_raw, new_values = unrotated_keys_values(layer, state.stm[i : i + 1, kept:].to(dtype))
            raw[:, :, kept:], values[:, :, kept:] = new_raw, new_values
            del new_raw, new_values
        first = kept if unmoved else 0  # rotate the written slots, and the kept ones if they moved
        _rotate_into(
            layer, keys[:, :, first:], raw[:, :, first:], cos[i : i + 1, B + first :], sin[i : i + 1, B + first :]
        )
        buffers.append((keys_buffer, values_buffer))
        raw_keys.append(raw)
    if in_place:
        old_prefix.retire()
    return MemoryPrefix.from_buffers(buffers, B + M, start_of_prompt, raw_keys=raw_keys, num_bos=B, positions=positions)
