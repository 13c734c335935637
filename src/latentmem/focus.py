"""Focused reads (`focused_writes`): a prompt reads only the writes that share its rarest tokens.

Why: the memory adapters read one write well alone, and badly among other writes. On SmolLM2
(docs/experiments.md) a note written into an empty memory is answered far more often than the same
note read among the pool's other writes, even when every one of its slots is still there, while
ranking writes by the rare tokens they share with the question finds the answering write among
hundreds. So a focused read ranks the writes in memory for the prompt, gathers the best writes'
slots wherever they now live (short-term pool, or M+'s long-term store), and reads each once,
[bos ; K slots ; prompt], the best write nearest the prompt: the layout the adapters were trained
on, for a write however many writes ago, at the cost of reading K slots instead of N. (Repeating the
write over an N-slot pool, as a first write fills an empty one, read 0.53 where one copy reads 0.68.)

Ranking: M+ uses its token index (`ltm/matching.py:rank_writes_by_tokens`, with long-term memory
reaching far back); MemoryLLM ranks the writes that still hold slots in the pool by the distinct
token ids each injection recorded when written (`Injection.distinct_tokens`), with the same
inverse-document-frequency weights: a token every write holds weighs nothing, a rare shared name
decides. Both rank by `MemoryLLM.ranking_tokens(prompt)`: the prompt without its chat template's
text, question words and punctuation (`models.ranking_stop_tokens`), which say nothing of what the
question is about.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .ltm.matching import positions_of, token_weight
from .state import EXTERNAL, MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM

# Ranked writes tried per layer before that layer keeps its own pool: a write may have lost every
# slot of one layer (random drops, long-term decay) and still hold others.
MAX_TRIED = 16


def rank_pool_writes(state: MemoryState, prompt_ids: torch.Tensor) -> list[int]:
    """Injection ids of the writes with slots in the short-term pool that share a token with
    `prompt_ids [n]`, best first: the sum of the shared tokens' inverse document frequencies
    (`ltm.matching.token_weight`, over those writes), ties to the newer write; writes sharing only
    common tokens are left out."""
    present = [w for w in torch.unique(state.sources).tolist() if w != EXTERNAL]
    tokens = {w: set(state.injections[w].distinct_tokens or ()) for w in present if w in state.injections}
    tokens = {w: t for w, t in tokens.items() if t}
    prompt = set(prompt_ids.reshape(-1).tolist())
    df = {t: sum(t in held for held in tokens.values()) for t in prompt}
    idf = {t: token_weight(d, len(tokens)) for t, d in df.items() if d}
    scores = {w: sum(idf.get(t, 0.0) for t in prompt & held) for w, held in tokens.items()}
    ranked = sorted((w for w, score in scores.items() if score > 0), reverse=True)  # newest first, then
    return sorted(ranked, key=lambda w: -scores[w])  # by score (stable: ties keep the newer first)


def write_slots(state: MemoryState, layer: int, write: int) -> torch.Tensor:
    """`[m, d]`: one write's slots in `layer`: those already evicted to long-term memory (older)
    first, then those still in the short-term pool, each in storage order."""
    short_term = state.stm[layer][(state.sources[layer] == write).to(state.stm.device)]
    if state.ltm is None or state.ltm.size(layer) == 0:
        return short_term
    found = torch.from_numpy(positions_of(state.ltm.sources(layer).numpy(), [write]))
    if len(found) == 0:
        return short_term
    long_term = torch.as_tensor(state.ltm.get(layer, found)["slots"]).to(short_term)
    return torch.cat([long_term, short_term])


def focused_pool(
    model: "MemoryLLM", state: MemoryState, prompt_ids: torch.Tensor | None = None, *, ranked=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool `[L, n*K, d]`, sources `[L, n*K]`) a focused read of `prompt_ids [n]` attends to
    (`ranked`: the writes `model.rank_writes_for(state, prompt_ids)` gives, when already ranked).

    Per layer: the K slots of each of the n = `focused_writes` best-ranked writes that hold any
    there, once each, the best last (nearest the prompt). That is the layout the adapters are
    trained to read: [bos ; one write's K slots]. A write that lost slots (random drops) repeats
    the ones left up to K; a write tiled over an empty pool gives one whole copy. A layer where
    fewer than n ranked writes hold slots repeats the ones found; a layer where none does, or a
    prompt that shares no rare token with any write (in a batch with prompts that do: a batch of
    such prompts alone is read by the base model), reads the pool's newest n*K slots.
    """
    if ranked is None:
        ranked = model.rank_writes_for(state, prompt_ids)
    ranked = list(ranked)[:MAX_TRIED]
    wanted, per_write = model.config.focused_writes, model.config.num_tokens
    size = wanted * per_write
    pools, sources = [], []
    for layer in range(state.num_layers):
        parts, owners = [], []
        for write in ranked:
            slots = write_slots(state, layer, write)
            if len(slots):
                parts.append(_fit(slots, per_write))
                owners.append(torch.full((per_write,), write, dtype=torch.long))
            if len(parts) == wanted:
                break
        if not parts:
            pools.append(_tile(state.stm[layer][-size:], size))
            sources.append(_tile(state.sources[layer][-size:], size))
            continue
        pools.append(_tile(torch.cat(parts[::-1]), size))
        sources.append(_tile(torch.cat(owners[::-1]), size))
    return torch.stack(pools), torch.stack(sources)


def _fit(slots: torch.Tensor, count: int) -> torch.Tensor:
    """A write's slots as exactly `count` rows: its first whole copy when it has more (a first
    write tiled over the pool), its slots repeated when it has fewer (some were dropped)."""
    return slots[:count] if len(slots) >= count else _tile(slots, count)


def _tile(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`rows` repeated along dim 0 to exactly `count`, cut from the front: a whole copy sits nearest
    the prompt (`pool.tile_to_fill`, for first writes, ends with a partial copy instead)."""
    copies = -(-count // len(rows))
    return rows.repeat(copies, *([1] * (rows.dim() - 1)))[-count:]
