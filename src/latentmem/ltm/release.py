"""The official M+ release's long-term memory, where latentmem deliberately differs.

With `MPlusConfig.release_compatible` (on for official checkpoints) latentmem reproduces what the
release computes:
- eviction: the K slots a write drops from short-term memory wait in a *pending* buffer, keyed at
  once and searched by reads, and arrive with the release's age for them: a short-term slot's
  position in the write that made it (K-1 for a write's first slot ... 0 for its last; 0 for the
  slots a checkpoint shipped), not the time it spent in short-term memory;
- every `update_ltm_frequency` writes the pending slots are merged into long-term memory with
  recall frequency `initial_rf_when_moving_stm_to_ltm`, then every frequency drops by
  `decay_frequency`, and slots at <= 0.01 are deleted, but only if more than `num_ltm_blocks * K`
  slots would be left; otherwise nothing is deleted and the drop is undone (`decay_all_or_nothing`);
- reading: no recall frequency ever rises (so long-term memory forgets first-in-first-out); a layer
  holding fewer than R = num_ltm_blocks * K long-term slots reads them tiled up to R
  (`tiled_positions`); the top R by score are read oldest first, ordered as the release orders them
  (`oldest_first`: numpy's default argsort of their ages, reversed, on positions in ascending order,
  so slots of equal age come in the order the release's own sort leaves them on this machine).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

# Ages the release stores are floats (its ParameterList in the model dtype); a value further than
# this from an integer is not an age it wrote.
AGE_TOLERANCE = 1e-3


def integral_ages(values, what: str = "ages") -> np.ndarray:
    """Ages as int64: integers as they are, floats (float32/bfloat16/float16, as the release saves
    them) rounded; negative, non-finite or clearly fractional values are refused."""
    values = torch.as_tensor(values).detach().cpu().reshape(-1)
    if values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"{what} must be numbers, got {values.dtype}")
    if values.is_floating_point():
        wide = values.double()
        if not torch.isfinite(wide).all():
            bad = wide[~torch.isfinite(wide)][0].item()
            raise ValueError(
                f"{what} hold a non-finite value ({bad}); a float16 age overflows above 65504: "
                "save the checkpoint's ages in float32 or bfloat16"
            )
        rounded = wide.round()
        off = (wide - rounded).abs()
        if (off > AGE_TOLERANCE).any():
            bad = wide[off > AGE_TOLERANCE][0].item()
            raise ValueError(f"{what} must be whole numbers of tokens, got {bad}")
        values = rounded
    values = values.long()
    if (values < 0).any():
        raise ValueError(f"{what} must be >= 0 (tokens written since the slot's write), got {values.min().item()}")
    return values.numpy()


def tiled_positions(size: int, k: int) -> np.ndarray:
    """The positions the release reads from a layer of `size` (< k) slots: 0..size-1 repeated, the
    last k of them (size 5, k 8: 2 3 4 0 1 2 3 4)."""
    copies = -(-k // size)
    return np.tile(np.arange(size, dtype=np.int64), copies)[-k:]


def oldest_first(ages: np.ndarray) -> np.ndarray:
    """The order in which the release reads retrieved slots of these ages: np.argsort (its default,
    unstable kind, as the release calls it) reversed, so equal ages keep the release's own order."""
    return np.argsort(np.asarray(ages, dtype=np.float64))[::-1].copy()


def decay_all_or_nothing(
    memory, values: Callable[[object], np.ndarray], decay: float, threshold: float, keep_more_than: int
) -> int:
    """The release's decay of one layer (`memory`, a LayerMemory): every recall frequency drops by
    `decay` and slots at <= `threshold` go, if more than `keep_more_than` remain; else nothing goes
    and the drop is undone. Pinned slots (value +inf, a latentmem addition) always stay."""
    if memory.size == 0:
        return 0
    frequencies = memory.records["frequencies"].mutable()
    frequencies -= np.float32(decay)
    keep = (frequencies > threshold) | (values(memory) == np.inf)
    if np.count_nonzero(keep) > keep_more_than:
        return memory.keep(keep)
    frequencies += np.float32(decay)
    return 0


def arrival_ages(num_new: int) -> np.ndarray:
    """Release ages of a write's new short-term slots (`[num_new]`: num_new-1 ... 0)."""
    return np.arange(num_new - 1, -1, -1, dtype=np.int64)


def track_short_term_ages(store, shape: tuple[int, int], num_new: int, evicted) -> np.ndarray:
    """The release's ages of the slots a write evicted, `[L, k]`, keeping `store.stm_ages [L, N]`
    (the release's age of every short-term slot) in step with the write.

    Needs the evicted positions (`evicted.positions [L, k]`); without them every evicted slot
    arrives with age 0, which is exact for the slots a checkpoint shipped."""
    num_layers, num_slots = shape
    new = np.broadcast_to(arrival_ages(num_new), (num_layers, num_new))
    old = store.stm_ages if store.stm_ages is not None else np.zeros(shape, np.int64)
    if evicted is None:  # a first write tiles its slots over the whole pool
        copies = [new] * (num_slots // num_new) + ([new[:, num_new - num_slots % num_new :]] if num_slots % num_new else [])
        store.stm_ages = np.concatenate(copies, axis=1)
        return np.zeros((num_layers, 0), np.int64)
    positions = getattr(evicted, "positions", None)
    k = evicted.slots.shape[1]
    if positions is None:
        store.stm_ages = None
        return np.zeros((num_layers, k), np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    arrived = np.take_along_axis(old, positions, axis=1)
    survivors = np.ones(shape, bool)
    np.put_along_axis(survivors, positions, False, axis=1)
    store.stm_ages = np.concatenate([old[survivors].reshape(num_layers, num_slots - k), new], axis=1)
    return arrived
