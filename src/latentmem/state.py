"""MemoryState: everything that changes when memory is written, kept outside the model weights.

One loaded model serves any number of states (one per user or session). A state holds the
short-term pool `stm [L, N, d]`, per-slot ages and provenance, a write counter, the record of
every injection, and its own random generator, so forgetting is reproducible from a seed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .modeling import MemoryLLM

# Provenance id of slots that no injection of this state wrote (an assigned or loaded pool).
EXTERNAL = -1
# Pool updates remembered for readers that cache what they derive from the pool (`slot_origins`):
# enough for a long text written as several chunks between two reads.
POOL_LOG = 8


@dataclass
class Injection:
    """One write into memory: which text went in, when, under what label."""

    id: int
    source: str
    tokens: int
    timestamp: float = field(default_factory=time.time)
    importance: float = 1.0  # scales the value of its long-term slots; inf pins them
    distinct_tokens: list[int] | None = None  # token ids written, in order (kept for focused reads: focus.py)


class MemoryState:
    """The memory of one user or session for a given model shape.

    Attributes:
        stm: the short-term pool, `[L, N, d]`; the last K slots are always the newest write.
            Assigning a tensor replaces the pool (its slots get provenance `EXTERNAL`).
        ages: `[L, N]` number of writes each slot has survived.
        sources: `[L, N]` id of the injection that wrote each slot (`EXTERNAL` if none).
        write_count: writes (pool updates) so far.
        injections: the record of every injection, by id.
        generator: the state's own RNG; it decides which slots each write forgets.
        version: bumps on every change, so readers can cache what they derive from the pool.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        hidden_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
        fingerprint: str = "",
    ):
        self.shape = (num_layers, num_slots, hidden_size)
        self.fingerprint = fingerprint
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._stm = torch.zeros(self.shape, dtype=dtype, device=device)
        self.ages = torch.zeros(num_layers, num_slots, dtype=torch.long)
        self.sources = torch.full((num_layers, num_slots), EXTERNAL, dtype=torch.long)
        self.initialized = False
        self.write_count = 0
        self.injections: dict[int, Injection] = {}
        self.version = 0
        # (version before, version after, survivors [L, N-k]) of the latest writes, see `slot_origins`
        self._pool_log: deque[tuple[int, int, torch.Tensor]] = deque(maxlen=POOL_LOG)
        # Slots per copy when the pool is a first write tiled to fill it (`pool.tile_to_fill`), else None:
        # a save then stores one copy (persistence.py), checked against the pool before it is trusted.
        self.tile_period: int | None = None
        self.ltm = None  # M+ long-term memory (a LongTermStore), None for MemoryLLM
        self._journal = None  # persistence.py: the journaled file this state was last saved to or loaded from

    # --- the pool -------------------------------------------------------------------------
    @property
    def stm(self) -> torch.Tensor:
        return self._stm

    @stm.setter
    def stm(self, pool: torch.Tensor) -> None:
        if tuple(pool.shape) != self.shape:
            raise ValueError(f"stm must have shape {list(self.shape)} (layers, slots, hidden), got {list(pool.shape)}")
        self._stm = pool.detach().to(dtype=self._stm.dtype, device=self._stm.device).clone()
        self.ages.zero_()
        self.sources.fill_(EXTERNAL)
        self.initialized = True
        self.tile_period = None
        self.touch()

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def num_slots(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._stm.dtype

    @property
    def device(self) -> torch.device:
        return self._stm.device

    def touch(self) -> None:
        """Mark the state changed: cached memory keys/values derived from it are stale."""
        self.version += 1

    def replace_pool(
        self, stm: torch.Tensor, ages: torch.Tensor, sources: torch.Tensor, survivors: torch.Tensor | None = None
    ) -> None:
        """Install a pool with its per-slot records (used by writes and by loading).

        `survivors [L, N-k]`: the pool is the old pool's slots at these indices (ascending per
        layer) followed by k new slots, as a write leaves it; recorded for `slot_origins`.
        """
        before = self.version
        self._stm, self.ages, self.sources = stm, ages, sources
        self.initialized = True
        self.tile_period = None
        self.touch()
        if survivors is not None:
            small = survivors if survivors.stride(0) == 0 else survivors.to(torch.int32)  # shared draws: one row
            self._pool_log.append((before, self.version, small))

    def slot_origins(self, version: int) -> torch.Tensor | None:
        """`[L, N]`: where each slot of the pool sat in the pool of an earlier `version` (-1: written since).

        Known across writes only (`replace_pool` with survivors); None when anything else changed
        the pool in between (assignment, forgetting, loading, a first write) or the record is too old.
        Slots that came from `version` always come first in each layer, in their old order.
        """
        L, N, _ = self.shape
        chain, current = [], self.version
        for before, after, survivors in reversed(tuple(self._pool_log)):  # a snapshot: writers append
            if current == version:
                break
            if after != current:
                return None
            chain.append(survivors)
            current = before
        if current != version:
            return None
        origins = torch.arange(N).expand(L, N)
        for survivors in reversed(chain):
            kept = origins.gather(1, survivors.long().expand(L, -1))
            origins = torch.cat([kept, kept.new_full((L, N - kept.shape[1]), -1)], dim=1)
        return origins

    def clear(self) -> None:
        """Forget everything: back to an empty pool (the injection records are kept)."""
        self._stm = torch.zeros_like(self._stm)
        self.ages.zero_()
        self.sources.fill_(EXTERNAL)
        self.initialized = False
        self.tile_period = None
        self.touch()

    def injections_from(self, source: str) -> list[int]:
        """Ids of the injections recorded under a source label."""
        return [i.id for i in self.injections.values() if i.source == source]

    def record_injection(self, source: str, tokens: int, importance: float = 1.0) -> Injection:
        injection = Injection(id=len(self.injections), source=source, tokens=tokens, importance=importance)
        self.injections[injection.id] = injection
        return injection

    def to(self, device: torch.device | str) -> "MemoryState":
        """Move the pool to `device` (in place); provenance and RNG stay on the CPU."""
        self._stm = self._stm.to(device)
        self.touch()
        return self

    # --- introspection --------------------------------------------------------------------
    def surviving_slots(self) -> dict[int, int]:
        """How many slots (summed over layers) each injection still holds."""
        ids, counts = torch.unique(self.sources, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts) if i != EXTERNAL}

    def __repr__(self) -> str:
        L, N, d = self.shape
        return (
            f"MemoryState(layers={L}, slots={N}, hidden={d}, dtype={self.dtype}, writes={self.write_count}, "
            f"injections={len(self.injections)}, initialized={self.initialized})"
        )

    # --- persistence (see persistence.py) -------------------------------------------------
    def save(self, path: str | Path, *, slot_dtype: str | None = None, journal: bool = False) -> None:
        """Write the state atomically to one `.safetensors` file (tensors + JSON manifest).

        `slot_dtype="int8"`: slots stored as int8 with a scale each (lossy). `journal=True`: a save
        after writes appends only what changed to `<path>.journal` (see `persistence.save_state`).
        """
        from .persistence import save_state

        save_state(self, path, slot_dtype=slot_dtype, journal=journal)

    @classmethod
    def load(cls, path: str | Path, model: "MemoryLLM | None" = None) -> "MemoryState":
        """Read a state saved with `save`; with `model`, refuse one saved for another model shape."""
        from .persistence import load_state

        return load_state(path, model)
