"""Focused reads (`focused_writes`): a prompt reads only the writes that share its rarest tokens.

Why: the memory adapters read one write well when it fills the pool, and badly among other
writes. On SmolLM2 (docs/experiments.md) a note written into an empty memory (tiled over the pool)
is answered far more often than the same note read among the pool's other writes, even when every
one of its slots is still there, while ranking writes by the rare tokens they share with the
question finds the answering write among hundreds. So a focused read ranks the writes in memory
for the prompt, gathers the best writes' slots wherever they now live (short-term pool, or M+'s
long-term store), and reads them repeated over a pool of the usual size, the best write nearest
the prompt: the reading the adapter does best, for a write however many writes ago.

Ranking: M+ uses its token index (`ltm/matching.py:rank_writes_by_tokens`, with long-term memory
reaching far back); MemoryLLM ranks the writes that still hold slots in the pool by the distinct
token ids each injection recorded when written (`Injection.distinct_tokens`), with the same
inverse-document-frequency weights: a token every write holds weighs nothing, a rare shared name
decides.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .ltm.matching import positions_of
from .state import EXTERNAL, MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM

# Ranked writes tried per layer before that layer keeps its own pool: a write may have lost every
# slot of one layer (random drops, long-term decay) and still hold others.
MAX_TRIED = 16


def rank_pool_writes(state: MemoryState, prompt_ids: torch.Tensor) -> list[int]:
    """Injection ids of the writes with slots in the short-term pool that share a token with
    `prompt_ids [n]`, best first: the sum of the shared tokens' inverse document frequencies
    (BM25's, over those writes), ties to the newer write; writes sharing only common tokens are left out."""
    present = [w for w in torch.unique(state.sources).tolist() if w != EXTERNAL]
    tokens = {w: set(state.injections[w].distinct_tokens or ()) for w in present if w in state.injections}
    tokens = {w: t for w, t in tokens.items() if t}
    prompt = set(prompt_ids.reshape(-1).tolist())
    df = {t: sum(t in held for held in tokens.values()) for t in prompt}
    n = len(tokens)
    idf = {t: max(0.0, math.log((n - d + 0.5) / (d + 0.5))) for t, d in df.items() if d}
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


def focused_pool(model: "MemoryLLM", state: MemoryState, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool `[L, N, d]`, sources `[L, N]`) a focused read of `prompt_ids [n]` attends to.

    Per layer: the slots of the `focused_writes` best-ranked writes that hold any there (the best
    last, nearest the prompt), repeated to fill the N slots of the short-term pool (its newest
    copies last). A layer where no ranked write holds a slot, or a prompt that shares no rare
    token with any write, reads the short-term pool as it is.
    """
    ranked = list(model.rank_writes_for(state, prompt_ids))[:MAX_TRIED]
    wanted = model.config.focused_writes
    pools, sources = [], []
    for layer in range(state.num_layers):
        parts, owners = [], []
        for write in ranked:
            slots = write_slots(state, layer, write)
            if len(slots):
                parts.append(slots)
                owners.append(torch.full((len(slots),), write, dtype=torch.long))
            if len(parts) == wanted:
                break
        if not parts:
            pools.append(state.stm[layer])
            sources.append(state.sources[layer])
            continue
        pools.append(_tile(torch.cat(parts[::-1]), state.num_slots))
        sources.append(_tile(torch.cat(owners[::-1]), state.num_slots))
    return torch.stack(pools), torch.stack(sources)


def _tile(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`rows` repeated along dim 0 to exactly `count`, cut from the front: a whole copy sits nearest
    the prompt (`pool.tile_to_fill`, for first writes, ends with a partial copy instead)."""
    copies = -(-count // len(rows))
    return rows.repeat(copies, *([1] * (rows.dim() - 1)))[-count:]
