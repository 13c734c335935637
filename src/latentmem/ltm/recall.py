"""Reading with long-term memory (M+): retrieve per layer, then attend to [bos ; retrieved ; STM]
(other layouts: `MPlusConfig.retrieved_slots_position`).

Which long-term slots a layer retrieves depends on the prompt's hidden states entering that layer,
which depend on what earlier layers retrieved. So the first pass over a prompt walks the layers one
by one: score the layer's long-term keys with the prompt's queries, take the top R (oldest first),
put their keys/values, then the cached short-term keys/values, into that layer's cache, and run the
layer. Later generation steps reuse the filled cache through the backbone, as any read does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..positions import prompt_start, slot_positions
from ..prefix import prefix_keys_values
from ..reading import compute_memory_prefix
from ..state import MemoryState
from .matching import TOKEN_COMMON, positions_of, rank_writes, rank_writes_by_tokens

if TYPE_CHECKING:
    from ..mplus import MPlus


def short_term_slots_before_retrieved(config, num_slots: int) -> int:
    """How many short-term slots (oldest first) a read puts before the retrieved ones."""
    placement = config.retrieved_slots_position
    if placement == "first":
        return 0
    if placement == "before_newest_write":
        return num_slots - min(config.num_tokens, num_slots)
    return num_slots  # "last"


def retrieve(
    model: "MPlus", state: MemoryState, layer: int, normed: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots `[count, d]`, their injection ids `[count]`) retrieved for one prompt (`normed [n, d]`:
    the input-norm output), in reading order.

    `retrieval_unit="slot"` (the release): the top `count` slots, oldest first. `"write"`: whole
    writes (blocks of slots sharing provenance) ranked by their best slot's score, oldest write first.
    (`write_ranking="first_layer"` reads through `SharedWrites` instead, see `default_retrieval`.)
    """
    queries = model.retrieval_queries(layer, normed)
    if model.config.retrieval_unit == "write":
        indices = top_writes(state.ltm, layer, queries, count, model.config.write_candidates)
        return _read(model, state, layer, indices, in_order=True)
    indices, _ = state.ltm.search(layer, queries, count)
    return _read(model, state, layer, indices, in_order=False)


def _read(model: "MPlus", state: MemoryState, layer: int, indices: torch.Tensor, in_order: bool):
    """(slots, sources) at `indices`, oldest first unless already `in_order`; promotes them if configured."""
    found = state.ltm.get(layer, indices)
    if in_order:
        order = torch.arange(len(indices))
    else:
        order = torch.argsort(torch.as_tensor(found["ages"]), descending=True, stable=True)  # oldest first
    if model.config.promote_on_retrieval:
        state.ltm.promote(layer, indices, model.config.promote_on_retrieval)
    return torch.as_tensor(found["slots"])[order], torch.as_tensor(found["sources"])[order]


class SharedWrites:
    """One prompt's retrieval under `write_ranking="first_layer"` or `"tokens"`: the writes are
    ranked once, at the first layer (`ltm/matching.py`), and every layer then reads those same
    writes' long-term slots. `prompt_ids` (the prompt's real tokens) are what "tokens" ranks by."""

    def __init__(self, prompt_ids: torch.Tensor | None = None) -> None:
        self.ranked: torch.Tensor | None = None
        self.prompt_ids = prompt_ids

    def __call__(self, model: "MPlus", state: MemoryState, layer: int, normed: torch.Tensor, count: int):
        if self.ranked is None:
            if layer != 0:
                raise RuntimeError("SharedWrites ranks at the first layer: call it for layer 0 first")
            if model.config.write_ranking == "tokens":
                if self.prompt_ids is None:
                    raise ValueError('write_ranking="tokens" ranks by the prompt\'s token ids: pass prompt_ids')
                self.ranked = token_ranking(model, state, self.prompt_ids)
            else:
                self.ranked = first_layer_ranking(model, state, normed)
        chosen = collect_writes(state.ltm, layer, self.ranked, count, per_write=model.config.num_tokens)
        return _read(model, state, layer, chosen, in_order=True)


def first_layer_ranking(model: "MPlus", state: MemoryState, normed: torch.Tensor) -> torch.Tensor:
    """Writes with long-term slots, best first for a prompt (`normed`: its first layer's input-norm
    output), judged by their first-layer slots in long- and short-term memory (`rank_writes`)."""
    first = model.decoder.layers[0]

    def short_term_vectors(mask: torch.Tensor) -> torch.Tensor:  # only the candidates' slots are projected
        slots = state.stm[0][mask.to(state.stm.device)].to(model.dtype)
        return model.retrieval_keys(0, first.input_layernorm(slots))

    short_term = (state.sources[0], short_term_vectors)
    return rank_writes(state.ltm, 0, model.retrieval_queries(0, normed), match_candidates(model), short_term,
                       max_writes=FULLY_SCORED * model.config.num_ltm_blocks)  # fmt: skip


def token_ranking(model: "MPlus", state: MemoryState, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Writes sharing rare tokens with the prompt `[n]`, best first (`rank_writes_by_tokens`)."""
    return rank_writes_by_tokens(state.ltm, model.token_match_vectors(prompt_ids), TOKEN_COMMON)


def match_candidates(model: "MPlus") -> int:
    """Slots each prompt token proposes when writes are matched at the first layer (see `rank_writes`)."""
    return model.config.num_tokens * model.config.write_candidates


def default_retrieval(model: "MPlus", prompt_ids: torch.Tensor | None = None):
    """The retrieval one prompt (`prompt_ids [n]`, its real tokens) uses when no `retrieve_fn` is
    given (a fresh one per prompt)."""
    return SharedWrites(prompt_ids) if model.config.write_ranking != "per_layer" else retrieve


WRITES_PER_PASS = 16
# First-layer ranking scores in full this many times the writes a read takes (the rest are judged
# by the long-term slots the search found alone, which misses partly evicted writes). On `tiny`
# (per-write layout, 100 held-out questions) the answering write was found for 0.94 scoring every
# candidate, 0.93 with 16 and 0.70 with 4.
FULLY_SCORED = 16


def top_writes(store, layer: int, queries: torch.Tensor, count: int, candidates: int) -> torch.Tensor:
    """Positions of `count` long-term slots making up the best whole writes, in write order.

    Hierarchical search: the index proposes the `candidates * count` best slots; each write they
    belong to scores as its best candidate; the best writes contribute all their long-term slots
    until `count` are taken (the last write taken may be cut: the read's size is fixed). If the
    writes run out first, the best remaining single slots fill the rest.
    """
    positions, scores = store.search(layer, queries, count * candidates)
    sources = store.sources(layer)
    best: dict[int, float] = {}
    for source, score in zip(sources[positions].tolist(), scores.tolist()):
        best.setdefault(source, score)  # search returns best first
    ranked = sorted(best, key=best.get, reverse=True)
    return collect_writes(store, layer, ranked, count, fill=positions)


def collect_writes(store, layer: int, ranked, count: int, fill: torch.Tensor | None = None,
                   per_write: int | None = None) -> torch.Tensor:  # fmt: skip
    """Positions of up to `count` long-term slots of `layer`: the writes `ranked` (best first) whole,
    the last one cut to fit (its newest slots), then `fill` (default: the newest other slots); in
    write order. `per_write` caps what one write contributes (its newest slots): a write makes K
    slots per layer, and more are copies (the first write into an empty pool is tiled over it)."""
    sources = store.sources(layer)
    ranked = [int(r) for r in ranked]
    count = min(count, len(sources))
    taken: list[torch.Tensor] = []
    room, start = count, 0
    while room and start < len(ranked):
        # the slots of the next few best writes, in one pass over the layer (a few writes fill a read)
        chunk = ranked[start : start + WRITES_PER_PASS]
        start += WRITES_PER_PASS
        members = torch.from_numpy(positions_of(sources.numpy(), chunk))
        owners = sources[members]
        for source in chunk:
            if room == 0:
                break
            block = members[owners == source][-min(room, per_write or room):]  # its newest slots if cut
            taken.append(block)
            room -= len(block)
    chosen = torch.cat(taken) if taken else torch.empty(0, dtype=torch.long)
    if room:
        fill = torch.arange(len(sources) - 1, -1, -1) if fill is None else fill
        taken_mask = torch.zeros(len(sources), dtype=torch.bool)
        taken_mask[chosen] = True  # a mask, not torch.isin: that compares every pair here (1.3 s at 100k slots)
        extra = fill[~taken_mask[fill]][:room]
        chosen = torch.cat([chosen, extra])
    # write order: by injection id (ids grow with time), then position in the store (insertion order)
    order = torch.argsort(sources[chosen] * (len(sources) + 1) + chosen)
    return chosen[order]


def prefill_with_retrieval(
    model: "MPlus",
    state: MemoryState,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    count: int,
    labels: torch.Tensor | None = None,
    logits_to_keep: int = 0,
    use_cache: bool | None = True,
    retrieve_fn=None,
) -> CausalLMOutputWithPast:
    """The first pass over a prompt: per layer, retrieve, fill the cache with [bos ; retrieved ; STM], run the layer.

    `retrieve_fn` (same signature as `retrieve`) replaces the retriever, e.g. in training, to put
    the slots that answer the prompt in front of the model while the retriever still learns. Called
    through `MPlus.forward`, which computes it with the read adapter.
    """
    decoder = model.decoder
    batch, n = input_ids.shape
    # a retrieval per prompt row: with write_ranking="first_layer"/"tokens" each row keeps its own ranking
    real_ids = [row if attention_mask is None else row[attention_mask[b].bool()] for b, row in enumerate(input_ids)]
    row_retrieval = [retrieve_fn or default_retrieval(model, ids) for ids in real_ids]
    hidden = model.embed(input_ids, attention_mask=attention_mask)
    num_bos = 1 if model.bos_embedding is not None else 0
    # Short-term slots read before the retrieved ones: none in the release's [bos ; retrieved ; STM];
    # see `MPlusConfig.retrieved_slots_position` for the layouts that keep old slots near the prompt.
    # The short-term keys/values are computed (and cached) once with a gap where the retrieved go.
    after = short_term_slots_before_retrieved(model.config, state.num_slots)
    gap = (after, count)
    if model.training and torch.is_grad_enabled():
        stm = compute_memory_prefix(model, state.stm, start=num_bos, with_bos=False, gap=gap, sources=state.sources)
    else:
        stm = model.prefix_cache.get(model, state, start=num_bos, with_bos=False, gap=gap)
    prefix_len = num_bos + count + stm.length
    scheme, K = model.config.memory_positions, model.config.num_tokens
    if position_ids is None:
        position_ids = torch.arange(n, device=hidden.device)[None].expand(batch, -1)
    position_ids = position_ids + prompt_start(scheme, prefix_len, K)
    prompt_rope = decoder.rotary_emb(hidden, position_ids=position_ids)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(batch, prefix_len), attention_mask], dim=-1)
    real_tokens = attention_mask[:, prefix_len:].bool() if attention_mask is not None else None

    cache, mask = DynamicCache(config=model.backbone.config), None
    for i, layer in enumerate(decoder.layers):
        normed = layer.input_layernorm(hidden)
        heads, head_sources = [], []
        for b in range(batch):
            tokens = normed[b] if real_tokens is None else normed[b, real_tokens[b]]
            slots, sources = row_retrieval[b](model, state, i, tokens, count)
            # long-term slots live in host memory (the store can outgrow the GPU): bring them over
            slots = slots.to(device=hidden.device, dtype=hidden.dtype)
            heads.append(torch.cat([model.bos_embedding[i].to(hidden.dtype), slots]) if num_bos else slots)
            head_sources.append(sources)
        # bos at 0, then the retrieved slots where the layout puts them (one row of positions per prompt)
        positions = slot_positions(scheme, torch.stack(head_sources), K, first=num_bos + after)
        positions = torch.cat([torch.zeros(batch, num_bos, dtype=torch.long), positions], dim=1)
        head_rope = decoder.rotary_emb(hidden, position_ids=positions.to(hidden.device))
        keys, values = prefix_keys_values(layer, torch.stack(heads), head_rope)
        stm_keys, stm_values = (part.expand(batch, -1, -1, -1) for part in stm.layer(i))
        keys = torch.cat(
            [keys[:, :, :num_bos], stm_keys[:, :, :after], keys[:, :, num_bos:], stm_keys[:, :, after:]], 2
        )
        values = torch.cat(
            [values[:, :, :num_bos], stm_values[:, :, :after], values[:, :, num_bos:], stm_values[:, :, after:]], 2
        )
        cache.update(keys, values, i)
        if mask is None:  # every layer's prefix has the same length: one mask serves all
            mask = create_causal_mask(
                config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask,
                cache=cache, position_ids=position_ids,
            )  # fmt: skip
            # the mask was sized for the prompt on top of the prefix now in layer 0's cache
        hidden = layer(
            hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=prompt_rope, cache=cache
        )
    hidden = decoder.norm(hidden)
    kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    logits = model.backbone.lm_head(kept)
    loss = None
    if labels is not None:
        loss = model.backbone.loss_function(logits=logits, labels=labels, vocab_size=model.backbone.config.vocab_size)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache is not False else None)
