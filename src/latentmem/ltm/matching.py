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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

MATCH_SEED = 2_402_046  # never change: stored keys of saved memories were made with it


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


def rank_writes(store, layer: int, queries: torch.Tensor, per_token: int,
                short_term: tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                ) -> torch.Tensor:  # fmt: skip
    """Injection ids of the writes with long-term slots in `layer`, best first, scored by late
    interaction with `queries [n, h]` (unit rows, one per prompt token).

    Candidates are the writes owning some prompt token's top `per_token` slots (the store's search,
    so its approximate index serves large stores); every long-term slot of a candidate is then
    scored exactly, so a candidate's score does not depend on which of its slots the search found.
    `short_term`: (injection ids `[N]` of the same layer's short-term slots, a function giving the
    match vectors `[n, h]` of the slots a boolean mask `[N]` selects): the candidates' short-term
    slots then count as evidence too, so a write evicted only in part is judged by all its slots.
    Only those slots are projected (the pool is far larger than a few candidates' share of it).
    """
    sources = store.sources(layer)
    if len(sources) == 0:
        return torch.empty(0, dtype=torch.long)
    queries = queries.detach().float().cpu()
    hits = torch.cat([store.search(layer, row[None], per_token)[0] for row in queries])
    candidates = torch.unique(sources[hits])
    members = torch.from_numpy(np.flatnonzero(np.isin(sources.numpy(), candidates.numpy())))
    keys, owners = store.get(layer, members)["keys"].float(), sources[members]
    if short_term is not None:
        stm_sources, vectors_of = short_term
        kept = torch.isin(stm_sources.cpu(), candidates)
        if kept.any():
            keys = torch.cat([keys, vectors_of(kept).detach().float().cpu()])
            owners = torch.cat([owners, stm_sources.cpu()[kept]])
    similarity = keys @ queries.T  # [slots, tokens]
    writes, owner = torch.unique(owners, return_inverse=True)
    best = torch.full((len(writes), len(queries)), -math.inf)
    best = best.scatter_reduce(0, owner[:, None].expand_as(similarity), similarity, reduce="amax")
    order = torch.argsort(best.sum(dim=1), descending=True, stable=True)
    return writes[order]
