"""Pool update and decay (docs/design.md): how a write changes a layer's short-term memory.

First write into an empty pool: the new slots are tiled to fill all N positions. Every later
write forgets K slots chosen uniformly at random (one draw shared by all layers, or one per layer),
keeps the survivors in order and appends the K new slots at the end, so the last K slots are always
the newest write. A slot survives t later writes with probability (1 - K/N)^t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import MemoryState


def tile_to_fill(new: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Repeat `new [L, k, ...]` along dim 1 to exactly `num_slots`: N // k copies, then its last N % k."""
    k = new.shape[1]
    copies = [new] * (num_slots // k)
    if num_slots % k:
        copies.append(new[:, k - num_slots % k :])
    return torch.cat(copies, dim=1)


def tiled_from(pool: torch.Tensor, period: int) -> bool:
    """Whether `pool [L, N, ...]` is `tile_to_fill(pool[:, :period], N)` (compared in place, no copy)."""
    N = pool.shape[1]
    if not 0 < period <= N:
        return False
    tail = N % period
    body = N - tail  # whole copies: each equals the one before it
    return torch.equal(pool[:, period:body], pool[:, : body - period]) and torch.equal(
        pool[:, body:], pool[:, period - tail : period]
    )


def draw_survivors(
    num_slots: int, num_dropped: int, generator: torch.Generator, protected: torch.Tensor | None = None,
    oldest: bool = False,
) -> torch.Tensor:
    """Indices of the slots that survive a write, ascending (so survivors keep their order).

    Victims are drawn uniformly, or with `oldest` taken from the front of the pool (which is in
    write order: the oldest slots first); slots marked `protected [N]` are dropped only once no
    unprotected slot is left to drop (pinned memories, opt-in).
    """
    def shuffled(index: torch.Tensor) -> torch.Tensor:
        return index if oldest else index[torch.randperm(len(index), generator=generator)]

    if protected is None or not protected.any():
        if oldest:
            return torch.arange(num_dropped, num_slots)
        kept = torch.randperm(num_slots, generator=generator)[: num_slots - num_dropped]
        return kept.sort().values
    open_slots, guarded = (~protected).nonzero().view(-1), protected.nonzero().view(-1)
    order = torch.cat([shuffled(open_slots), shuffled(guarded)])
    return order[num_dropped:].sort().values


@dataclass
class Evicted:
    """The slots one write dropped from short-term memory, per layer: where M+ long-term memory begins."""

    slots: torch.Tensor  # [L, k, d]
    sources: torch.Tensor  # [L, k]
    ages: torch.Tensor  # [L, k]
    positions: torch.Tensor | None = None  # [L, k]: where they sat in the pool, ascending per layer


def write_slots(
    state: MemoryState,
    new_slots: torch.Tensor,
    injection_id: int,
    per_layer: bool,
    protected: torch.Tensor | None = None,
    recomputed: int = 0,
    oldest: bool = False,
) -> Evicted | None:
    """Apply one write of `new_slots [L, k, d]` to `state` (in place), with tiling or forgetting.

    Returns the evicted slots (None for the first write, which evicts nothing). `protected [L, N]`
    marks slots to drop last; `oldest`: drop the pool's oldest slots instead of random ones.
    `recomputed`: how many of the new slots (the first ones) re-ran the pool's newest slots instead
    of the context (a context shorter than K; see writing.py). Under the causal
    mask they never saw the context, so they keep the provenance of the slots they re-ran: forgetting
    an injection removes its re-run copies, and M+ learns to retrieve them for its questions.
    """
    L, N, _ = state.shape
    k = new_slots.shape[1]
    new_slots = new_slots.detach().to(dtype=state.dtype, device=state.device)
    new_sources = torch.full((L, k), injection_id, dtype=torch.long)
    if recomputed:
        if not state.initialized or recomputed > k:
            raise ValueError(f"{recomputed} recomputed slots need a written pool and at most the {k} new slots")
        new_sources[:, :recomputed] = state.sources[:, N - recomputed :]  # the pool's newest r slots
    new_ages = torch.zeros(L, k, dtype=torch.long)
    evicted = None

    if not state.initialized:
        state.replace_pool(tile_to_fill(new_slots, N), tile_to_fill(new_ages, N), tile_to_fill(new_sources, N))
        state.tile_period = k
    else:
        if k > N:
            raise ValueError(f"a write of {k} slots does not fit a pool of {N}")
        if per_layer:
            draws = [draw_survivors(N, k, state.generator, None if protected is None else protected[i], oldest)
                     for i in range(L)]  # fmt: skip
            survivors = torch.stack(draws)  # [L, N-k]
        else:
            guard = None if protected is None else protected[0]
            survivors = draw_survivors(N, k, state.generator, guard, oldest).expand(L, -1)
        dropped = torch.ones(L, N, dtype=torch.bool)
        dropped[torch.arange(L)[:, None], survivors] = False
        victims = dropped.nonzero()[:, 1].view(L, k)  # ascending per layer
        layer_index = torch.arange(L)[:, None]
        on_device = layer_index.to(state.device), victims.to(state.device)
        evicted = Evicted(
            state.stm[on_device], state.sources[layer_index, victims], state.ages[layer_index, victims], victims
        )
        # No second pool: at the sizes served (141 MB per SmolLM2 state, GBs at 8B) allocating one per
        # write costs more in page faults than the move itself. A pool that may not change is copied.
        pool = state.stm
        if not _updatable_in_place(pool):
            pool = pool.detach().clone(memory_format=torch.contiguous_format)
        keep_in_place(pool, survivors.to(state.device))
        pool[:, N - k :] = new_slots
        state.replace_pool(
            pool,
            torch.cat([state.ages[layer_index, survivors] + 1, new_ages], dim=1),
            torch.cat([state.sources[layer_index, survivors], new_sources], dim=1),
            survivors=survivors,
        )
    state.write_count += 1
    return evicted


def keep_in_place(pool: torch.Tensor, survivors: torch.Tensor, rows: int = 64) -> None:
    """Move each layer's surviving slots to the front of `pool [L, N, d]`, in order, in place.

    `survivors [L, m]` ascends per layer (a shared draw may be a stride-0 expansion of one row).
    Done `rows` slots at a time, front to back: slot i comes from survivors[i] >= i, so a block's
    sources lie at or behind the rows it overwrites and behind every row written before it, and
    each block is gathered before it is stored.
    """
    shared = survivors.shape[0] == 1 or survivors.stride(0) == 0
    m = survivors.shape[1]
    if shared and m and int(survivors[0, -1] - survivors[0, 0]) == m - 1 and int(survivors[0, 0]) >= 16:
        # One run from slot s on (forgetting the oldest): a shift, copied s slots at a time from
        # the slots just behind, which never overlap them; half the memory traffic of a gather.
        shift = int(survivors[0, 0])
        for start in range(0, m, shift):
            stop = min(start + shift, m)
            pool[:, start:stop] = pool[:, start + shift : stop + shift]
        return
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        if shared:
            pool[:, start:stop] = pool.index_select(1, survivors[0, start:stop])
        else:
            index = survivors[:, start:stop, None].expand(-1, -1, pool.shape[-1])
            pool[:, start:stop] = pool.gather(1, index)


def _updatable_in_place(pool: torch.Tensor) -> bool:
    """Whether a write may rearrange `pool` itself: not part of an autograd graph, contiguous, and
    not an inference-mode tensor outside inference mode (torch forbids those in-place updates)."""
    return (
        not pool.requires_grad
        and pool.is_contiguous()
        and (torch.is_inference_mode_enabled() or not pool.is_inference())
    )


def forget_injections(state: MemoryState, injection_ids: set[int] | list[int]) -> int:
    """Remove every slot the given injections wrote (targeted forgetting). Returns the slots removed.

    The pool keeps its size: in each layer, a forgotten slot is overwritten by a copy of a randomly
    drawn surviving slot of that layer (with its provenance and age), as the first write tiles its
    slots. A layer left with no survivors empties the whole state (nothing else to read).
    """
    ids = torch.tensor(sorted(set(injection_ids)), dtype=torch.long)
    forgotten = torch.isin(state.sources, ids)  # [L, N]
    removed = int(forgotten.sum())
    if removed == 0:
        return 0
    survivors_per_layer = (~forgotten).sum(dim=1)
    if (survivors_per_layer == 0).any():
        state.clear()
        return removed
    stm, ages, sources = state.stm.clone(), state.ages.clone(), state.sources.clone()
    for layer in range(state.num_layers):
        holes = forgotten[layer].nonzero().view(-1)
        if holes.numel() == 0:
            continue
        kept = (~forgotten[layer]).nonzero().view(-1)
        donors = kept[torch.randint(len(kept), (len(holes),), generator=state.generator)]
        stm[layer, holes.to(stm.device)] = stm[layer, donors.to(stm.device)]
        ages[layer, holes], sources[layer, holes] = ages[layer, donors], sources[layer, donors]
    state.replace_pool(stm, ages, sources)
    return removed
