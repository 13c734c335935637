"""Choosing whole writes once per prompt from the first layer's slots (`MPlusConfig.write_ranking="first_layer"`).

Why the first layer: a write's slots there are its context tokens after one decoder layer, still
close to their input embeddings, so a prompt token finds the slots of the tokens it shares with a
write (a name, "spare key", "teapot"). Deeper slots mix their context and lose that identity:
measured on `tiny` (docs/experiments.md), the cosine between prompt embeddings and first-layer slots
ranks the answering write first for nearly every held-out question, the same score on the other
layers' slots hardly better than chance, and learned per-layer retrievers found 0.21 of the writes.

Keys: a fixed random orthonormal projection to h dims (h orthonormal rows), normalised, so they fit
the long-term store's h-dim keys and its indexes and need no training. Orthonormal rows matter:
on `tiny`, +-1 and Gaussian projections of the same size ranked the answering write first for
0.60-0.88 of the questions, orthonormal ones for 0.90 (three draws each). It is drawn from numpy's
PCG64 with a fixed seed and made unique by QR with a positive diagonal, so a memory saved today is
searched with the same projection in any later process (`tests/test_matching.py` pins its values).

Score: late interaction (ColBERT's MaxSim): score(write) = sum over prompt tokens t of the best
cosine between t and the write's slots. A rare token shared with one write lifts that write; common
tokens lift every write about equally.

Ranking by tokens (`write_ranking="tokens"`): where the first layer's slots do not keep their
tokens (SmolLM2: a write's K slots are its last K tokens after one layer, so a note's first fact
often has no slot of its own), a write is keyed by every distinct token it holds (the same fixed
projection of the token's first-layer input), and scores like lexical retrieval: the sum, over
distinct prompt tokens it contains (cosine >= TOKEN_MATCH: the same token), of the token's inverse
document frequency among the writes in memory. Common words then weigh nothing and a rare shared
name decides. Measured on `smollm2-135m-mplus` (60 held-out notes among 180 English passages, 88
chat-formatted questions): the answering write ranks first for 0.84 and in the top 4 for 0.97,
against 0.01-0.10 from its first-layer slots and 0.15 / 0.28 from unweighted token matching.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

TOKEN_COMMON = 128  # a prompt token found in this many writes or more weighs nothing (and bounds the search)
MATCH_SEED = 2_402_046  # never change: stored keys of saved memories were made with it
# Same token. A token matches itself at cosine 1 - 3e-7; on SmolLM2 (64-dim keys) 0.16 of the
# vocabulary has another token at >= 0.95, 0.013 at >= 0.97 and none of 3,000 sampled at >= 0.99
# (measured: 0.85 let near tokens in, ranking the answering write first for 0.45 instead of 0.84).
TOKEN_MATCH = 0.99
# Token weights count this many empty writes besides the real ones. BM25's IDF, log((n - df + 0.5) /
# (df + 0.5)), is zero or less for a token in half the writes or more: in a memory of one or two
# writes every shared token would weigh nothing and nothing would be ranked. In a memory of
# hundreds the prior changes no weight that matters.
PRIOR_WRITES = 4


def token_weight(df, writes: int):
    """Inverse document frequency of a token found in `df` of `writes` writes (clamped at 0)."""
    n = writes + PRIOR_WRITES
    if isinstance(df, torch.Tensor):
        return torch.log((n - df + 0.5) / (df + 0.5)).clamp(min=0)
    return max(0.0, math.log((n - df + 0.5) / (df + 0.5)))


def match_projection(hidden_size: int, key_dim: int) -> torch.Tensor:
    """The fixed projection `[h, d]` with orthonormal rows, the same on every machine and version."""
    if not 0 < key_dim <= hidden_size:
        raise ValueError(f"first-layer matching needs 0 < selector_hidden_dim <= hidden size ({hidden_size}), got {key_dim}")
    gaussian = np.random.Generator(np.random.PCG64(MATCH_SEED)).standard_normal((hidden_size, key_dim))
    q, r = np.linalg.qr(gaussian)  # reduced: q [d, h]
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)  # the unique QR with a positive diagonal (no LAPACK sign choice)
    return torch.from_numpy(np.ascontiguousarray(q.T, dtype=np.float32))


def match_vectors(normed: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Unit-length h-dim match vectors of first-layer states already passed through the layer's input norm."""
    return F.normalize(normed.float() @ projection.float().T, dim=-1)


def positions_of(sources: np.ndarray, ids) -> np.ndarray:
    """Positions whose source is one of `ids` (a few), by one clipped gather from a lookup table over
    the ids' range: 1.3 ms at 1M slots, where numpy's isin took 10 (table) or 11 ms (sort)."""
    ids = np.asarray(ids, dtype=np.int64)
    low = int(ids.min())
    table = np.zeros(int(ids.max()) - low + 3, dtype=bool)  # [0] and [-1]: every id out of range
    table[ids - low + 1] = True
    return np.flatnonzero(table.take(sources - (low - 1), mode="clip"))


def rank_writes(store, layer: int, queries: torch.Tensor, per_token: int,
                short_term: tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                max_writes: int | None = None) -> torch.Tensor:  # fmt: skip
    """Injection ids of the writes with long-term slots in `layer`, best first, scored by late
    interaction with `queries [n, h]` (unit rows, one per prompt token).

    Candidates are the writes owning some prompt token's top `per_token` slots (the store's per-row search,
    so its approximate index serves large stores); every long-term slot of a candidate is then
    scored exactly, so a candidate's score does not depend on which of its slots the search found.
    `short_term`: (injection ids `[N]` of the same layer's short-term slots, a function giving the
    match vectors `[n, h]` of the slots a boolean mask `[N]` selects): the candidates' short-term
    slots then count as evidence too, so a write evicted only in part is judged by all its slots.
    Only those slots are projected (the pool is far larger than a few candidates' share of it).
    `max_writes`: only the candidates best by the slots the search found are scored in full (and
    ranked), which bounds the work however many writes the prompt's tokens touch.
    """
    sources = store.sources(layer)
    if len(sources) == 0:
        return torch.empty(0, dtype=torch.long)
    queries = queries.detach().float().cpu()
    hits = store.search_each(layer, queries, per_token)  # [tokens, k]: one pass for every prompt token
    candidates = torch.unique(sources[hits])
    if max_writes is not None and len(candidates) > max_writes:
        found = (store.keys(layer, hits.reshape(-1)).view(*hits.shape, -1) * queries[:, None]).sum(-1)
        candidates = candidates[torch.topk(_late_interaction(found.T, sources[hits].T, candidates), max_writes).indices]
    members = torch.from_numpy(positions_of(sources.numpy(), candidates.numpy()))
    keys, owners = store.keys(layer, members), sources[members]
    if short_term is not None:
        stm_sources, vectors_of = short_term
        kept = torch.isin(stm_sources.cpu(), candidates)
        if kept.any():
            keys = torch.cat([keys, vectors_of(kept).detach().float().cpu()])
            owners = torch.cat([owners, stm_sources.cpu()[kept]])
    writes = torch.unique(owners)
    order = torch.argsort(_late_interaction(keys @ queries.T, owners, writes), descending=True, stable=True)
    return writes[order]


def _late_interaction(similarity: torch.Tensor, owners: torch.Tensor, writes: torch.Tensor) -> torch.Tensor:
    """Score `[len(writes)]` of sorted `writes`: the sum over tokens of the best similarity among a
    write's slots (`similarity [slots, tokens]`, `owners`: each slot's write, same shape or `[slots]`)."""
    owner = torch.searchsorted(writes, owners)
    # contiguous: scatter_reduce over an expanded (stride-0) index is ~40x slower on CPU (measured)
    owner = owner[:, None].expand_as(similarity).contiguous() if owner.ndim == 1 else owner.contiguous()
    best = torch.full((len(writes), similarity.shape[1]), -math.inf).scatter_reduce(0, owner, similarity, reduce="amax")
    return best.clamp(min=-1.0).sum(dim=1)  # a token none of a write's found slots matched counts as -1


def distinct_first(token_ids: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct id in `token_ids [n]`, in order of appearance."""
    _, inverse = torch.unique(token_ids, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(token_ids), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(token_ids)), reduce="amin")
    return torch.sort(first).values


def rank_writes_by_tokens(store, queries: torch.Tensor, per_token: int) -> torch.Tensor:
    """Injection ids of the indexed writes sharing a token with the prompt, best first (`queries
    [n, h]`: the prompt tokens' match vectors; see the module doc). A token found in `per_token` or
    more writes counts as common (weight 0), which also keeps the search per token bounded."""
    sources = store.token_sources()
    if len(sources) == 0 or len(queries) == 0:
        return torch.empty(0, dtype=torch.long)
    queries = torch.unique(queries.detach().float().cpu(), dim=0)  # a repeated prompt token counts once
    hits = store.search_tokens(queries, per_token)  # [q, k]
    similarity = (store.token_keys(hits.reshape(-1)).view(*hits.shape, -1) * queries[:, None]).sum(-1)
    matched = similarity >= TOKEN_MATCH
    writes_total = store.indexed_writes()
    # distinct (prompt token, write) matches, then each token's document frequency and weight
    span = int(sources.max()) + 1
    rows = torch.arange(len(hits))[:, None].expand_as(hits)[matched]
    pairs = torch.unique(rows * span + sources[hits][matched])
    row, write = pairs // span, pairs % span
    df = torch.bincount(row, minlength=len(hits)).double()
    idf = token_weight(df, writes_total)
    idf[matched.all(dim=1) & (hits.shape[1] >= per_token)] = 0  # in per_token writes or more: common
    writes, owner = torch.unique(write, return_inverse=True)
    scores = torch.zeros(len(writes), dtype=torch.float64).index_add_(0, owner, idf[row])
    keep = scores > 0
    writes, scores = writes[keep], scores[keep]
    newest_first = torch.argsort(writes, descending=True)  # ties go to the newer write
    by_score = torch.argsort(scores[newest_first], descending=True, stable=True)
    return writes[newest_first][by_score]
