"""Where memory sits relative to the prompt: the RoPE positions of memory slots (`memory_positions`).

RoPE makes attention depend on the distance between a query and a key. Three layouts:

- "pool" (the release, and always for official checkpoints): [bos ; slot_1 .. slot_M ; prompt] at
  positions 0, 1..M, M+1.. . The newest write sits next to the prompt; an older write's distance
  grows with every later write, so a model trained mostly on reads of the newest write reads an old
  one from places it has rarely seen.
- "per_write": every write keeps the positions it had as the newest write. A slot is at K - j,
  where j counts the later slots of the same write still in that layer (mod K); the prompt starts
  at K + 1. Every write, old or new, is then where the model read it right after writing it
  (training reads `[bos ; new slots]` at 0, 1..K): a slot's distance to the prompt never grows.
- "fixed": every slot at position K, one step before the prompt (InfLLM's single fixed distance);
  the order of slots within a write is then visible to attention only through their contents.

Positions depend on the state (its provenance record) and never on the prompt, so memory keys are
still rotated once per memory version and cached.
"""

from __future__ import annotations

import torch

MEMORY_POSITIONS = ("pool", "per_write", "fixed")


def check_scheme(scheme: str) -> str:
    if scheme not in MEMORY_POSITIONS:
        raise ValueError(f"memory_positions must be one of {MEMORY_POSITIONS}, got {scheme!r}")
    return scheme


def later_slots_of_same_write(sources: torch.Tensor) -> torch.Tensor:
    """`sources [L, M]` (injection id per slot) -> `[L, M]`: how many slots to the right share its source."""
    L, M = sources.shape
    index = torch.arange(M, device=sources.device).expand(L, M)
    # Sort by (source, position from the right): each write's slots become a run, newest slot first.
    order = ((sources + 1) * M + (M - 1 - index)).argsort(dim=1)
    sorted_sources = sources.gather(1, order)
    starts = torch.ones_like(sorted_sources, dtype=torch.bool)
    starts[:, 1:] = sorted_sources[:, 1:] != sorted_sources[:, :-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    later = torch.empty_like(index)
    later.scatter_(1, order, index - run_start)
    return later


def slot_positions(scheme: str, sources: torch.Tensor, num_tokens: int, first: int = 1) -> torch.Tensor:
    """RoPE positions `[L, M]` of memory slots whose provenance is `sources [L, M]`.

    `first` is where "pool" starts counting (the position after bos); the other layouts place
    slots at 1..K whatever precedes them.
    """
    L, M = sources.shape
    if scheme == "pool":
        return (first + torch.arange(M, device=sources.device)).expand(L, M)
    if scheme == "fixed":
        return torch.full((L, M), num_tokens, dtype=torch.long, device=sources.device)
    check_scheme(scheme)
    return num_tokens - later_slots_of_same_write(sources) % num_tokens


def prompt_start(scheme: str, prefix_length: int, num_tokens: int) -> int:
    """Position of the prompt's first token after a memory prefix of `prefix_length` entries (bos included)."""
    return prefix_length if scheme == "pool" else num_tokens + 1
