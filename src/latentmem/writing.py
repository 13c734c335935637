"""Writing into memory (MemoryLLM's "self-update"; docs/design.md, Writing) and the `inject` entry point.

For every layer l, independently, the layer input is
    z = [bos_l ; last K slots of STM_l ; h_l]       positions 0, 1..K, K+1..K+n
with the new-memory positional embedding added to the last K positions. The first
P = 1 + min(K, n) positions are prefix (keys/values only); the rest are computed normally. The
outputs at the last K computed positions are layer l's new slots; those at the last n positions
are h_{l+1}. So with n >= K the new slots are the outputs of the last K context tokens; with n < K
the newest K - n old slots are recomputed alongside the context.

An empty pool has no slots to put in front, so the first write runs the context alone from
position 0 (and without bos), as the official implementation does.

Training writes one context into each of many states per step; `inject_batch` runs those writes as
one padded batch (`compute_first_write_slots` for empty pools, `compute_new_slots_batch` otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from .pool import tile_to_fill, write_slots
from .prefix import prefix_keys_values, rotary_embeddings
from .state import MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM


@dataclass
class InjectionResult:
    """What one `inject` call wrote."""

    injection_id: int
    chunks: int
    tokens: int
    slots_written: int  # new slots per layer, summed over chunks


def compute_new_slots(model: MemoryLLM, state: MemoryState, input_ids: torch.Tensor) -> torch.Tensor:
    """The slots one context writes, `[L, K, d]` (`[L, min(K, n), d]` into an empty pool).

    Pure: `state` is only read. Differentiable when called with gradients enabled (training). One
    write is a batch of one: the layouts are spelled out in `compute_new_slots_batch` (written pool)
    and `compute_first_write_slots` (empty pool).
    """
    return compute_slots_batch(model, [state], [input_ids.reshape(-1)])[0]


def new_memory_embedding(model: MemoryLLM, positions: torch.Tensor, ends: torch.Tensor, dtype) -> torch.Tensor:
    """`[B, T, d]`: the new-memory embedding at row b's K positions before `ends[b]` (what becomes memory), 0 elsewhere."""
    K = model.config.num_tokens
    newest = (positions[None] >= ends[:, None] - K) & (positions[None] < ends[:, None])
    return newest[..., None].to(dtype) * model.new_memory_positional_emb.to(dtype)


def compute_first_write_slots(model: MemoryLLM, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
    """`compute_new_slots` into empty pools for a batch of contexts at once: `[L, min(K, n_b), d]` each.

    A write into an empty pool is the context alone from position 0 (no memory prefix, no bos), so
    contexts of different lengths batch with right padding: under the causal mask no real position
    sees a pad, and each row's new-memory embedding and slots are cut at its own length.
    """
    decoder, K = model.decoder, model.config.num_tokens
    device = model.device
    lengths = torch.tensor([c.numel() for c in contexts], device=device)
    ids = torch.nn.utils.rnn.pad_sequence([c.to(device) for c in contexts], batch_first=True)
    hidden = model.embed(ids)  # [B, n_max, d]; a pad's token shift only reaches later pads
    positions = torch.arange(ids.shape[1], device=device)
    new_memory_emb = new_memory_embedding(model, positions, lengths, hidden.dtype)
    rope = rotary_embeddings(decoder.rotary_emb, hidden, 0, ids.shape[1])
    mask = create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden.new_empty(*ids.shape, 0),
        attention_mask=None,
        cache=None,
        position_ids=positions[None],
    )
    outputs = []
    for layer in decoder.layers:
        x = hidden + new_memory_emb  # as in compute_new_slots: every layer's input gets it
        hidden = layer(x, attention_mask=mask, position_ids=positions[None], position_embeddings=rope)
        outputs.append(hidden)
    stacked = torch.stack(outputs, dim=1)  # [B, L, n_max, d]
    return [stacked[b, :, max(0, n - K) : n] for b, n in enumerate(lengths.tolist())]


def compute_new_slots_batch(model: MemoryLLM, states: list[MemoryState], contexts: list[torch.Tensor]) -> list:
    """`compute_new_slots` for several non-empty states at once, one context each: `[L, K, d]` per state.

    Row b is laid out as in `compute_new_slots`: a prefix `[bos ; K - r_b newest slots]` and then,
    computed, the `r_b = max(0, K - n_b)` newest slots that are recomputed followed by the context.
    Prefixes are left-padded to the longest (RoPE sees only distances, which left-padding keeps; the
    padding is masked) and the computed parts right-padded (under the causal mask no real position
    sees a pad), so every row's slots equal its own unbatched write.
    """
    decoder, K, device = model.decoder, model.config.num_tokens, model.device
    if not all(state.initialized for state in states):
        raise ValueError("compute_new_slots_batch writes into non-empty states (compute_first_write_slots: empty ones)")
    lengths = torch.tensor([c.numel() for c in contexts], device=device)
    recomputed = (K - lengths).clamp(min=0)  # r_b
    computed = recomputed + lengths  # C_b = max(K, n_b)
    memory = torch.stack([state.stm[:, -K:] for state in states], dim=1).to(model.dtype)  # [L, B, K, d]
    num_bos = 0
    if model.bos_embedding is not None:
        bos = model.bos_embedding.to(memory.dtype)[:, None].expand(-1, len(states), -1, -1)
        memory, num_bos = torch.cat([bos, memory], dim=2), 1
    prefix_lengths = num_bos + K - recomputed  # P_b
    P, C = int(prefix_lengths.max()), int(computed.max())
    slot = torch.arange(num_bos + K, device=device)
    # Row b's prefix is memory[..., :P_b], shifted right by P - P_b; its recomputed slots memory[..., P_b:].
    source = (slot[None, :P] - (P - prefix_lengths[:, None])).clamp(min=0)  # [B, P]
    prefix_real = slot[None, :P] >= P - prefix_lengths[:, None]
    index = source[None, :, :, None].expand(memory.shape[0], -1, -1, memory.shape[-1])
    prefix = memory.gather(2, index) * prefix_real[None, :, :, None].to(memory.dtype)  # [L, B, P, d]
    position = torch.arange(C, device=device)
    is_recomputed = position[None] < recomputed[:, None]  # [B, C]
    rec_index = (prefix_lengths[:, None] + position[None]).clamp(max=num_bos + K - 1)
    rec_slots = memory.gather(2, rec_index[None, :, :, None].expand(memory.shape[0], -1, -1, memory.shape[-1]))

    ids = torch.nn.utils.rnn.pad_sequence([c.to(device) for c in contexts], batch_first=True)
    embedded = model.embed(ids)  # [B, n_max, d]
    context_index = (position[None] - recomputed[:, None]).clamp(0, ids.shape[1] - 1)  # context token at each position
    hidden = embedded.gather(1, context_index[..., None].expand(-1, -1, embedded.shape[-1]))  # [B, C, d]
    new_memory_emb = new_memory_embedding(model, position, computed, hidden.dtype)

    cache = DynamicCache()
    prefix_rope = rotary_embeddings(decoder.rotary_emb, hidden, 0, P)
    for i, layer in enumerate(decoder.layers):
        cache.update(*prefix_keys_values(layer, prefix[i], prefix_rope), i)
    rope = rotary_embeddings(decoder.rotary_emb, hidden, P, C)
    position_ids = (P + position)[None].expand(len(states), -1)
    real = torch.cat([prefix_real, position[None] < computed[:, None]], dim=1).long()
    mask = create_causal_mask(
        config=decoder.config, inputs_embeds=hidden.new_empty(len(states), C, 0), attention_mask=real,
        cache=cache, position_ids=position_ids,
    )  # fmt: skip
    new_slots = []
    for i, layer in enumerate(decoder.layers):
        x = torch.where(is_recomputed[..., None], rec_slots[i], hidden) + new_memory_emb
        hidden = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rope, cache=cache)
        new_slots.append(hidden)
    stacked = torch.stack(new_slots, dim=1)  # [B, L, C, d]
    return [stacked[b, :, c - K : c] for b, c in enumerate(computed.tolist())]


def compute_slots_batch(model: MemoryLLM, states: list[MemoryState], contexts: list[torch.Tensor]) -> list:
    """`compute_new_slots` of one context per state, empty and written pools alike, in (at most) two batches.

    With `isolated_writes`, every context is written as into an empty pool (its text alone), and a
    written pool still takes K slots per write (a context shorter than K repeats its slots).
    """
    isolated = model.config.isolated_writes
    empty = [b for b, state in enumerate(states) if isolated or not state.initialized]
    filled = [b for b in range(len(states)) if b not in empty]
    slots = {}
    with model.adapters.use("write"):  # this call's adapter, whatever other threads compute meanwhile
        if empty:
            K = model.config.num_tokens
            for b, new in zip(empty, compute_first_write_slots(model, [contexts[b] for b in empty])):
                slots[b] = tile_to_fill(new, K) if states[b].initialized else new
        if filled:
            slots.update(
                zip(filled, compute_new_slots_batch(model, [states[b] for b in filled], [contexts[b] for b in filled]))
            )
    return [slots[b] for b in range(len(states))]


def store_slots(
    model: MemoryLLM, state: MemoryState, new: torch.Tensor, injection_id: int, context: torch.Tensor | int
) -> None:
    """Put one write's new slots into `state`'s pool, as every write does: drops (`forgetting`) sparing the
    model's protected slots, then the model's `after_write` (M+: evicted slots into long-term memory).

    `context`: the written token ids `[n]` (or only their count n, for a model that does not index
    what it writes: `MPlus.note_write`); of the k new slots, the first k - n (if any) re-ran old
    slots and keep their provenance (`write_slots`).
    """
    if isinstance(context, torch.Tensor):
        model.note_write(state, injection_id, context)
        context = context.numel()
    protected = model.protected_slots(state)
    recomputed = 0 if model.config.isolated_writes else max(0, new.shape[1] - context)  # isolated: all its own
    per_layer = model.config.drop_memory_per_layer
    oldest = model.config.forgetting == "oldest"
    evicted = write_slots(state, new, injection_id, per_layer, protected=protected, recomputed=recomputed, oldest=oldest)
    model.after_write(state, evicted)


def split_into_chunks(input_ids: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Cut a 1-D id tensor into the fewest near-equal chunks of at most `chunk_size` tokens.

    Near-equal (sizes differ by at most one) keeps the last chunk as long as the others, so it never
    falls under the minimum length the model was trained on.
    """
    n = input_ids.numel()
    num_chunks = max(1, math.ceil(n / chunk_size))
    sizes = [n // num_chunks + (1 if i < n % num_chunks else 0) for i in range(num_chunks)]
    return list(torch.split(input_ids, sizes))


def tokenize_context(input_ids=None, text=None, tokenizer=None) -> torch.Tensor:
    """One context as a 1-D id tensor, from ids or from text (tokenized without BOS)."""
    if (input_ids is None) == (text is None):
        raise ValueError("pass exactly one of input_ids= or text= (with tokenizer=)")
    if text is not None:
        if tokenizer is None:
            raise ValueError("text= needs tokenizer= to turn it into token ids")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        # The released models were trained on contexts without BOS.
        input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise ValueError(f"inject takes one context at a time, got a batch of {input_ids.shape[0]}")
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D (or [1, n]), got shape {list(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError("nothing to inject: the context is empty")
    return input_ids.long()


@torch.no_grad()
def inject(
    model: MemoryLLM,
    state: MemoryState,
    input_ids=None,
    text: str | None = None,
    tokenizer=None,
    *,
    allow_short: bool = False,
    source: str = "",
    importance: float = 1.0,
) -> InjectionResult:
    """Write a context into `state`: chunk it, compute each chunk's new slots, update the pool."""
    model.check_state(state)
    ids = tokenize_context(input_ids, text, tokenizer)
    cfg = model.config
    chunks = split_into_chunks(ids, cfg.chunk_size)
    shortest = min(c.numel() for c in chunks)
    if shortest < cfg.min_context_tokens and not allow_short:
        raise ValueError(
            f"context has {ids.numel()} tokens; MemoryLLM was trained on contexts of >= {cfg.min_context_tokens}"
            " (pass allow_short=True to inject anyway)"
        )
    vocab = cfg.backbone_config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"input_ids hold ids outside the vocabulary 0..{vocab - 1}")
    if not importance > 0:
        raise ValueError(f"importance must be > 0 (float('inf') pins), got {importance}")
    injection = state.record_injection(source, ids.numel(), importance)
    slots = 0
    for chunk in chunks:
        new = compute_new_slots(model, state, chunk.to(model.device))
        store_slots(model, state, new, injection.id, chunk)
        slots += new.shape[1]
    return InjectionResult(injection.id, len(chunks), ids.numel(), slots)


@torch.no_grad()
def inject_batch(
    model: MemoryLLM, states: list[MemoryState], contexts: list[torch.Tensor], source: str = ""
) -> list[int]:
    """`inject` one context into each of several states (different states, one chunk each), the writes batched.

    For training, where every memory state gets a short context per round: the pool updates (random
    drops, M+ eviction hooks) still run per state, exactly as `inject` runs them. Returns the injection ids.
    """
    if len({id(state) for state in states}) != len(states):
        raise ValueError("inject_batch takes each state once (a second write must see the first)")
    too_long = [c.numel() for c in contexts if c.numel() > model.config.chunk_size]
    if too_long:
        raise ValueError(f"contexts of {too_long} tokens need several chunks: use inject")
    for state in states:
        model.check_state(state)
    injections = [state.record_injection(source, c.numel()) for state, c in zip(states, contexts)]
    written = compute_slots_batch(model, states, contexts)
    for state, context, new, injection in zip(states, contexts, written, injections):
        store_slots(model, state, new, injection.id, context)
    return [injection.id for injection in injections]
