"""The M+ retriever (docs/design.md): low-dimensional keys for long-term slots and queries for prompts.

Per layer, three small MLPs map the layer's input-norm output (d) to h = `selector_hidden_dim`:
`query_proj` for prompt tokens, `key_proj` for slots moving to long-term memory, and
`encoder_query_proj` (kept for checkpoint compatibility with the release, which trains it for
the write side). A slot's score for a prompt is the mean over prompt tokens of sigmoid(q . k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def selector_mlp(hidden_size: int, key_dim: int, num_layers: int) -> nn.Sequential:
    """Linear(d, 2h) -> SiLU -> Linear(2h, h), no biases (deeper: more SiLU-separated 2h layers)."""
    if num_layers < 1:
        raise ValueError(f"num_selector_layers must be >= 1, got {num_layers}")
    if num_layers == 1:
        return nn.Sequential(nn.Linear(hidden_size, key_dim, bias=False))
    layers: list[nn.Module] = [nn.Linear(hidden_size, 2 * key_dim, bias=False)]
    for _ in range(num_layers - 2):
        layers += [nn.SiLU(), nn.Linear(2 * key_dim, 2 * key_dim, bias=False)]
    layers += [nn.SiLU(), nn.Linear(2 * key_dim, key_dim, bias=False)]
    return nn.Sequential(*layers)


class LayerRetriever(nn.Module):
    """The retriever of one decoder layer."""

    def __init__(self, hidden_size: int, key_dim: int, num_layers: int = 2):
        super().__init__()
        self.query_proj = selector_mlp(hidden_size, key_dim, num_layers)
        self.key_proj = selector_mlp(hidden_size, key_dim, num_layers)
        self.encoder_query_proj = selector_mlp(hidden_size, key_dim, num_layers)

    def keys(self, normed_slots: torch.Tensor) -> torch.Tensor:
        """Retrieval keys `[..., h]` of slots already passed through the layer's input norm."""
        return self.key_proj(normed_slots)

    def queries(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """Retrieval queries `[..., h]` of prompt hidden states already passed through the input norm."""
        return self.query_proj(normed_hidden)


def retrieval_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """score(slot) = mean over query rows of sigmoid(q . k): queries [q, h], keys [M, h] -> [M]."""
    return torch.sigmoid(queries @ keys.T).mean(dim=0)


def retriever_loss(queries: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Balanced binary cross-entropy of slot relevance (M+'s retriever training).

    `queries [q, h]` come from the target's (detached) hidden states, `keys [M, h]` from the
    (detached) slots; `positive [M]` marks the slots written by the contexts the target continues.
    Both classes weigh the same, however rare positives are.
    """
    probs = retrieval_scores(queries, keys).clamp(1e-6, 1 - 1e-6)  # the score used at read time
    positive = positive.to(probs.dtype)
    n_pos, n_neg = positive.sum().clamp(min=1), (1 - positive).sum().clamp(min=1)
    weights = positive / n_pos + (1 - positive) / n_neg
    return (F.binary_cross_entropy(probs, positive, reduction="none") * weights).sum() / 2


def write_scores(slot_scores: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(write ids `[W]`, each write's score `[W]`): a write scores as its best slot, as `top_writes` ranks them."""
    writes, owner = torch.unique(sources, return_inverse=True)
    best = torch.full((len(writes),), float("-inf"), dtype=slot_scores.dtype, device=slot_scores.device)
    return writes, best.scatter_reduce(0, owner.to(slot_scores.device), slot_scores, reduce="amax")


def write_ranking_loss(queries: torch.Tensor, keys: torch.Tensor, sources: torch.Tensor, target: int,
                       temperature: float = 0.05) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of picking the answering write among the candidate writes (whole-write retrieval).

    Each write scores as its best slot (what `retrieval_unit="write"` ranks by); a softmax over the
    writes (scores / `temperature`: scores are means of sigmoids, in (0, 1)) is trained towards
    `target`. Unlike the slot loss, which lifts every positive slot a little, this pushes the
    answering write above its strongest competitors, which is what a top-few read needs.
    """
    writes, scores = write_scores(retrieval_scores(queries, keys), sources)
    hit = (writes == target).nonzero().flatten()
    if len(hit) != 1:
        raise ValueError(f"write {target} is not among the candidate slots' sources")
    return F.cross_entropy((scores / temperature)[None].float(), hit.to(scores.device))
