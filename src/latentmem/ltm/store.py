"""LongTermStore: M+ long-term memory, off the accelerator, scaling past RAM.

One store per MemoryState; one independent memory per layer. Slots evicted from short-term
memory arrive with their retrieval keys (`add`); every write ages them (`advance_ages`); every few
writes their recall frequency decays and forgotten slots are deleted (`decay`); a prompt retrieves
the best slots per layer (`search`, then `get`), and retrieved slots can be promoted so they live
longer (`promote`). Positions (the indices this API takes and returns) are insertion order, oldest
first; they stay valid until the next call that deletes slots (add with a budget, decay,
remove_sources).

A slot's value is recall frequency x importance. Importance +inf pins a slot: pinned slots are
never deleted by `decay` and are evicted by the `max_slots` budget only when nothing else is left
to evict. Among equal values the oldest slot goes first (first-in-first-out, like the release).

Storage (see table.py): numpy arrays per layer; slots in the store dtype (bfloat16 kept as its
uint16 bits), keys float32 (the index and rescoring need float32; half precision would make
retrieval disagree with the model's own scores), ages as birth times on a write clock (int64),
frequencies and importance float32, sources int64. `save` writes a folder atomically and `open`
memory-maps it (see files.py). Not thread-safe: one writer at a time, like a MemoryState.

The official release's long-term memory (`MPlusConfig.release_compatible`, see release.py) keeps
evicted slots *pending* until a merge every few writes: `add_pending`, `merge_pending`. Pending slots
have positions after the merged ones (size .. size + pending_size - 1): searches and `get` see
them, `size` does not count them. With `release_reads`, `search` also returns what the release
reads, in the release's order (see `search`).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import torch

from . import release
from .index import INDEX_KINDS, SearchSettings, exact_scores, mean_sigmoid_scores, merge_row_top_k, row_top_k
from .layer import LayerMemory

# Slot dtypes and how they are kept in numpy (which has no bfloat16: its bits go in a uint16).
SLOT_DTYPES = {torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float32: np.float32}


class LongTermStore:
    """Per-layer long-term memory: slots `[M_l, d]` with keys `[M_l, h]`, ages, recall frequencies,
    provenance (injection ids) and importance. `search_settings` tunes the approximate indexes."""

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        key_dim: int,
        *,
        dtype: torch.dtype = torch.float16,
        index: str = "exact",
        max_slots: int | None = None,
        min_slots: int = 0,
    ):
        for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size), ("key_dim", key_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in SLOT_DTYPES:
            raise ValueError(f"dtype {dtype} is not supported for slots; use one of {list(SLOT_DTYPES)}")
        if index not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {index!r}; choose one of {', '.join(INDEX_KINDS)}")
        if not isinstance(min_slots, int) or min_slots < 0:
            raise ValueError(f"min_slots must be an int >= 0, got {min_slots!r}")
        if max_slots is not None and (not isinstance(max_slots, int) or max_slots < max(1, min_slots)):
            raise ValueError(f"max_slots must be None or an int >= max(1, min_slots={min_slots}), got {max_slots!r}")
        self.num_layers, self.hidden_size, self.key_dim = num_layers, hidden_size, key_dim
        self.dtype, self.index_kind = dtype, index
        self.max_slots, self.min_slots = max_slots, min_slots
        self.clock = 0  # total age advance so far; a slot's age is clock - its birth
        self.search_settings = SearchSettings()
        self._layers = [LayerMemory(hidden_size, key_dim, SLOT_DTYPES[dtype], index) for _ in range(num_layers)]
        # The official release's bookkeeping (release.py): slots evicted since the last merge, and
        # whether searches return what the release reads; both stay empty/off otherwise.
        self._pending = [LayerMemory(hidden_size, key_dim, SLOT_DTYPES[dtype], "exact") for _ in range(num_layers)]
        self.release_reads = False
        self.stm_ages: np.ndarray | None = None  # [L, N]: the age each short-term slot would arrive with
        # Token keys of the writes in memory (`write_ranking="tokens"`, ltm/matching.py): one key per
        # distinct token of a write, its source the write; no slot content (one zero column).
        self._tokens = LayerMemory(1, key_dim, np.dtype(np.float16), index)
        # A token's matches are near duplicates of it (cosine >= 0.95): the nearest few IVF lists hold
        # them, so the token table is searched with few lists (the slots' default scans 1/16 of them).
        self.token_search_settings = SearchSettings(nprobe=16)

    # --- introspection ----------------------------------------------------------------------
    def size(self, layer: int) -> int:
        """Slots in a layer's long-term memory (pending slots not counted)."""
        return self._layer(layer).size

    def pending_size(self, layer: int) -> int:
        """Evicted slots waiting for the next `merge_pending` (positions size .. size + pending - 1)."""
        self._layer(layer)
        return self._pending[layer].size

    def sources(self, layer: int) -> torch.Tensor:
        """The injection id of every slot in a layer, `[size + pending]` in position order (no slots read)."""
        parts = [self._layer(layer).record("sources"), self._pending[layer].record("sources")]
        return torch.from_numpy(np.concatenate(parts))

    def __repr__(self) -> str:
        sizes = [m.size for m in self._layers]
        return (
            f"LongTermStore(layers={self.num_layers}, hidden={self.hidden_size}, key_dim={self.key_dim}, "
            f"dtype={self.dtype}, index={self.index_kind!r}, slots per layer {min(sizes)}..{max(sizes)}, "
            f"max_slots={self.max_slots}, min_slots={self.min_slots})"
        )

    # --- writes -----------------------------------------------------------------------------
    def add(
        self,
        layer: int,
        slots: torch.Tensor,
        keys: torch.Tensor,
        sources: torch.Tensor,
        *,
        frequency: float = 10.0,
        importance: torch.Tensor | float = 1.0,
    ) -> None:
        """Append k slots `[k, d]` with their keys `[k, h]` and injection ids `[k]`, age 0, recall
        `frequency`; then evict the lowest-value slots while the layer exceeds `max_slots`."""
        memory = self._layer(layer)
        rows = self._rows(slots, keys, sources, frequency, importance)
        if rows is None:
            return
        memory.append(*rows)
        if self.max_slots is not None and memory.size > self.max_slots:
            order = np.argsort(self._values(memory), kind="stable")  # lowest value, then oldest, first
            keep = np.ones(memory.size, bool)
            keep[order[: memory.size - self.max_slots]] = False
            memory.keep(keep)

    def add_pending(
        self,
        layer: int,
        slots: torch.Tensor,
        keys: torch.Tensor,
        sources: torch.Tensor,
        *,
        ages: torch.Tensor | int = 0,
        frequency: float = 10.0,
        importance: torch.Tensor | float = 1.0,
    ) -> None:
        """Like `add`, but the slots wait in the layer's pending buffer (searched, not yet in long-term
        memory) until `merge_pending`, as the release keeps them; they arrive with `ages` `[k]`."""
        self._layer(layer)
        rows = self._rows(slots, keys, sources, frequency, importance)
        if rows is None:
            return
        slot_rows, key_rows, records = rows
        records["births"] = self.clock - release.integral_ages(torch.as_tensor(ages).expand(len(slot_rows)), "ages")
        self._pending[layer].append(slot_rows, key_rows, records)

    def merge_pending(self, decay: float, keep_more_than: int, threshold: float = 0.01) -> int:
        """Move every layer's pending slots to long-term memory, then decay as the release does (see
        `release.decay_all_or_nothing`). Returns the number of slots deleted (all layers)."""
        deleted = 0
        for memory, pending in zip(self._layers, self._pending):
            if pending.size:
                everything = np.arange(pending.size)
                records = {name: np.array(pending.record(name)) for name in LayerMemory.RECORDS if name != "ids"}
                memory.append(pending.slots_at(everything), pending.gather_keys(everything), records)
                pending.keep(np.zeros(pending.size, bool))
            deleted += release.decay_all_or_nothing(memory, self._values, decay, threshold, keep_more_than)
        return deleted

    def _rows(self, slots, keys, sources, frequency, importance):
        """Validated numpy rows of an `add`: (slots, keys, records), or None when there are none."""
        k = self._check_rows("slots", slots, self.hidden_size)
        self._check_rows("keys", keys, self.key_dim, k)
        if not isinstance(sources, torch.Tensor) or sources.shape != (k,) or sources.is_floating_point():
            raise ValueError(f"sources must be an integer tensor of shape [{k}] (one injection id per slot)")
        if not math.isfinite(frequency):
            raise ValueError(f"frequency must be finite, got {frequency}")
        importance = self._importance(importance, k)
        keys = keys.detach().to("cpu", torch.float32)
        if not torch.isfinite(keys).all():
            raise ValueError("keys contain NaN or inf; they would poison every search of this layer")
        if k == 0:
            return None
        stored = slots.detach().to("cpu", self.dtype)
        if torch.isinf(stored).any() and not torch.isinf(slots).any():
            raise ValueError(
                f"slots overflow {self.dtype} (values up to {slots.abs().max().item():.3g}); "
                "create the store with dtype=torch.bfloat16 or torch.float32"
            )
        records = {
            "births": np.full(k, self.clock, np.int64),
            "frequencies": np.full(k, frequency, np.float32),
            "sources": sources.detach().cpu().numpy().astype(np.int64),
            "importance": importance,
        }
        return self._to_numpy(stored), keys.numpy(), records

    def advance_ages(self, amount: int) -> None:
        """Age every slot of every layer by `amount` (M+ calls this with K on every write)."""
        if isinstance(amount, bool) or not isinstance(amount, numbers.Integral) or amount < 0:
            raise ValueError(f"amount must be an int >= 0, got {amount!r}")
        self.clock += int(amount)

    def decay(self, amount: float, threshold: float = 0.01) -> int:
        """Lower every recall frequency by `amount`, then delete slots whose frequency is <= threshold,
        except pinned slots and except as many of the highest-value ones as keep `min_slots` per
        layer. Returns the number deleted (all layers)."""
        if not math.isfinite(amount) or not math.isfinite(threshold):
            raise ValueError(f"amount and threshold must be finite, got {amount} and {threshold}")
        deleted = 0
        for memory in self._layers:
            if memory.size == 0:
                continue
            frequencies = memory.records["frequencies"].mutable()
            frequencies -= np.float32(amount)
            values = self._values(memory)
            doomed = np.flatnonzero((frequencies <= threshold) & (values != np.inf))
            allowed = max(0, memory.size - self.min_slots)
            if len(doomed) > allowed:  # spare the highest-value ones (ties: the newest)
                doomed = doomed[np.argsort(values[doomed], kind="stable")[:allowed]]
            keep = np.ones(memory.size, bool)
            keep[doomed] = False
            deleted += memory.keep(keep)
        return deleted

    def promote(self, layer: int, indices, amount: float = 1.0) -> None:
        """Raise the recall frequency of the slots at `indices` by `amount` (once per occurrence),
        so that retrieved slots outlive unused ones."""
        memory = self._layer(layer)
        positions = self._positions(memory.size, indices)
        np.add.at(memory.records["frequencies"].mutable(), positions, np.float32(amount))

    def remove_sources(self, source_ids) -> int:
        """Delete every slot, in every layer, written by these injection ids (targeted forgetting;
        `min_slots` does not apply: the caller asked for these to go). Returns how many."""
        if isinstance(source_ids, (set, frozenset, range)) or not hasattr(source_ids, "__len__"):
            source_ids = list(source_ids) if not isinstance(source_ids, int) else [source_ids]
        ids = np.asarray(torch.as_tensor(source_ids, dtype=torch.long).reshape(-1))
        removed = sum(m.keep(~np.isin(m.record("sources"), ids)) for m in self._layers + self._pending)
        self._tokens.keep(~np.isin(self._tokens.record("sources"), ids))  # token keys are not slots: not counted
        return removed

    def set_layer_stats(self, layer: int, *, ages=None, frequencies=None) -> None:
        """Overwrite every slot's age and/or recall frequency in a layer (`[size]` each), e.g. when
        loading an official M+ checkpoint, which stores them per slot."""
        memory = self._layer(layer)
        for name, values in (("ages", ages), ("frequencies", frequencies)):
            if values is None:
                continue
            values = torch.as_tensor(values).detach().cpu().reshape(-1)
            if len(values) != memory.size:
                raise ValueError(f"{name} has {len(values)} values, layer {layer} holds {memory.size} slots")
            if name == "ages":
                memory.records["births"].mutable()[:] = self.clock - release.integral_ages(values, f"layer {layer}'s ages")
            else:
                if not torch.isfinite(values).all():
                    raise ValueError(f"layer {layer}'s recall frequencies must be finite")
                memory.records["frequencies"].mutable()[:] = values.float().numpy()

    # --- reads ------------------------------------------------------------------------------
    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top min(k, size + pending) slots for queries `[q, h]` by mean_q sigmoid(q . key): (positions
        `[k']`, scores `[k']`), best first, no duplicates. Scores are exact for every index kind.

        With `release_reads`, what the official release reads instead (release.py): a layer holding
        fewer than k long-term slots has them tiled up to k (pending slots unseen), and the positions
        come oldest first, in the release's order among equal ages, instead of best first."""
        memory, pending = self._layer(layer), self._pending[layer]
        if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[1] != self.key_dim:
            shape = list(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise ValueError(f"queries must be a tensor [q, {self.key_dim}] (one row per prompt token), got {shape}")
        if len(queries) == 0:
            raise ValueError("queries has no rows; pass at least one prompt token's query")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        queries_t = queries.detach().to("cpu", torch.float32).T.contiguous()
        if self.release_reads and 0 < memory.size < k:
            positions = release.tiled_positions(memory.size, int(k))
            scores = mean_sigmoid_scores(memory.gather_keys(positions), queries_t)
            return self._release_order(layer, torch.from_numpy(positions), scores)
        k = min(int(k), memory.size + pending.size)
        if k == 0:
            return torch.empty(0, dtype=torch.long), torch.empty(0)
        positions, scores = self._scored(memory, queries_t, min(k, memory.size))
        if pending.size:
            positions = torch.cat([positions, memory.size + torch.arange(pending.size)])
            scores = torch.cat([scores, exact_scores(pending, queries_t)])
        top = torch.topk(scores, k)
        if not self.release_reads:
            return positions[top.indices], top.values
        ascending = torch.sort(positions[top.indices])  # the release reads its top k in position order
        return self._release_order(layer, ascending.values, top.values[torch.argsort(positions[top.indices])])

    def search_each(self, layer: int, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Each query row's own top min(k, size + pending) slots by q . key: positions `[q, k']`, best
        first per row. One pass over the layer for all rows (or the approximate index's per-row
        candidates, rescored exactly), not one search per row: what ranking whole writes token by
        token needs (ltm/matching.py). Order by q . key is order by sigmoid(q . key) per row."""
        return self._search_each(self._layer(layer), self._pending[layer], queries, k, self.search_settings)

    def _search_each(self, memory: LayerMemory, pending: LayerMemory | None, queries: torch.Tensor, k: int,
                     settings: SearchSettings) -> torch.Tensor:  # fmt: skip
        if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[1] != self.key_dim:
            shape = list(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise ValueError(f"queries must be a tensor [q, {self.key_dim}], got {shape}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        queries_t = queries.detach().to("cpu", torch.float32).T.contiguous()
        pending_size = pending.size if pending is not None else 0
        k = min(int(k), memory.size + pending_size)
        if k == 0 or len(queries) == 0:
            return torch.empty(len(queries), 0, dtype=torch.long)
        if memory.size:
            candidates = self._row_candidates(memory, queries_t.T, k, settings)
            best = row_top_k(memory, queries_t, min(k, memory.size), candidates)
        if pending_size:
            offset = torch.arange(pending_size) + memory.size
            extra = row_top_k(pending, queries_t, min(k, pending_size), None)
            extra = (extra[0], offset[extra[1]])
            best = merge_row_top_k(best, extra, k) if memory.size else extra
        return best[1]

    # --- token keys of writes (write_ranking="tokens") ---------------------------------------
    def add_write_tokens(self, source: int, keys: torch.Tensor) -> None:
        """Index one write's token keys `[n, h]` (one per distinct token) under its injection id."""
        self._check_rows("keys", keys, self.key_dim)
        n = len(keys)
        if n == 0:
            return
        self._tokens.append(np.zeros((n, 1), np.float16), keys.detach().to("cpu", torch.float32).numpy(), {
            "births": np.full(n, self.clock, np.int64), "frequencies": np.zeros(n, np.float32),
            "sources": np.full(n, int(source), np.int64), "importance": np.ones(n, np.float32),
        })  # fmt: skip

    def token_sources(self) -> torch.Tensor:
        """The write (injection id) of every indexed token key, `[n]` in position order."""
        return torch.from_numpy(np.array(self._tokens.record("sources")))  # a copy: the record may be memory-mapped

    def token_keys(self, positions) -> torch.Tensor:
        """Token keys `[len(positions), h]` at these positions of the token index."""
        positions = self._positions(self._tokens.size, positions)
        return torch.from_numpy(self._tokens.gather_keys(positions))

    def search_tokens(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Each query row's top min(k, tokens) token keys by q . key: positions `[q, k']` (`search_each`)."""
        return self._search_each(self._tokens, None, queries, k, self.token_search_settings)

    def indexed_writes(self) -> int:
        """How many writes have token keys."""
        sources = self._tokens.record("sources")
        changes = np.count_nonzero(sources[1:] != sources[:-1])
        if len(sources) < 2 or np.all(sources[1:] >= sources[:-1]):  # appended write by write: sorted
            return int(len(sources) > 0) + changes  # (np.unique would sort: 10 ms at 300k tokens)
        return len(np.unique(sources))

    def keep_write_tokens(self, sources) -> int:
        """Drop the token keys of every write not in `sources` (writes with no slot left); returns how many."""
        keep = np.isin(self._tokens.record("sources"), np.asarray(torch.as_tensor(sources, dtype=torch.long)))
        return self._tokens.keep(keep)

    def _row_candidates(self, memory: LayerMemory, queries: torch.Tensor, k: int, settings: SearchSettings
                        ) -> np.ndarray | None:  # fmt: skip
        """Sorted unique positions the approximate index proposes for each row's top k, or None to scan."""
        index = memory.index
        # Half `search`'s over-fetch: the index already ranks each row by q . key, the order wanted
        # (its lists are what it misses; 1x recalled 0.88 of each row's top k in the tests, 2x 0.9+)
        count = k * max(1, settings.candidate_factor // 2)
        if memory.size == 0 or index is None or count >= memory.size or not index.sync(memory, settings):
            return None
        positions = _live_positions(memory, index.candidate_ids(queries.numpy(), index.over_fetch(memory, count), settings))
        return positions if len(positions) >= k else None  # the index came up short: scan instead

    def retrievable(self, layer: int, k: int) -> int:
        """How many slots `search(layer, ..., k)` returns: min(k, size + pending), or k when
        `release_reads` tiles a non-empty layer."""
        memory, pending = self._layer(layer), self._pending[layer]
        if self.release_reads and memory.size:
            return k
        return min(k, memory.size + pending.size)

    def _scored(self, memory: LayerMemory, queries_t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, exact scores) of a layer's merged slots worth ranking for a top k: every slot,
        or the approximate index's candidates."""
        positions = self._candidates(memory, queries_t.T, k) if k else None
        if positions is None:
            return torch.arange(memory.size), exact_scores(memory, queries_t)
        return torch.from_numpy(positions), mean_sigmoid_scores(memory.gather_keys(positions), queries_t)

    def _release_order(self, layer: int, positions: torch.Tensor, scores: torch.Tensor):
        ages = self.get(layer, positions)["ages"].numpy()
        order = torch.from_numpy(release.oldest_first(ages))
        return positions[order], scores[order]

    def _candidates(self, memory: LayerMemory, queries: torch.Tensor, k: int) -> np.ndarray | None:
        """Sorted unique positions proposed by the approximate index, or None to search exactly."""
        settings, index = self.search_settings, memory.index
        count = k * settings.candidate_factor
        if index is None or count >= memory.size or not index.sync(memory, settings):
            return None
        ids = index.candidate_ids(queries.mean(0, keepdim=True).numpy(), index.over_fetch(memory, count), settings)
        if settings.row_hits:
            ids = np.concatenate([ids, index.candidate_ids(queries.numpy(), settings.row_hits, settings)])
        positions = _live_positions(memory, ids)
        if len(positions) < k:  # the index came up short (e.g. a tiny nprobe): be exact instead
            return None
        return positions

    def get(self, layer: int, indices) -> dict[str, torch.Tensor]:
        """Slots at `indices` (positions, pending ones included, in the given order): 'slots' [k, d] in
        the store dtype, 'keys' [k, h] float32, 'ages', 'frequencies', 'sources', 'importance' [k]."""
        memory, pending = self._layer(layer), self._pending[layer]
        positions = self._positions(memory.size + pending.size, indices)
        in_pending = positions >= memory.size
        if in_pending.any():
            parts = [self._fields(memory, positions[~in_pending]), self._fields(pending, positions[in_pending] - memory.size)]
            fields = {}
            for name in parts[0]:
                fields[name] = np.empty((len(positions), *parts[0][name].shape[1:]), parts[0][name].dtype)
                fields[name][~in_pending], fields[name][in_pending] = parts[0][name], parts[1][name]
        else:
            fields = self._fields(memory, positions)
        got = {name: torch.from_numpy(values) for name, values in fields.items()}
        if self.dtype == torch.bfloat16:
            got["slots"] = got["slots"].view(torch.int16).view(torch.bfloat16)  # uint16 bits -> bfloat16
        return got

    def keys(self, layer: int, indices) -> torch.Tensor:
        """Keys `[k, h]` float32 at `indices` (positions, pending included), without reading any slot."""
        memory, pending = self._layer(layer), self._pending[layer]
        positions = self._positions(memory.size + pending.size, indices)
        in_pending = positions >= memory.size
        keys = np.empty((len(positions), self.key_dim), np.float32)
        keys[~in_pending] = memory.gather_keys(positions[~in_pending])
        if in_pending.any():
            keys[in_pending] = pending.gather_keys(positions[in_pending] - memory.size)
        return torch.from_numpy(keys)

    def _fields(self, memory: LayerMemory, positions: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "slots": memory.slots_at(positions),
            "keys": memory.gather_keys(positions),
            "ages": self.clock - memory.record("births")[positions],
            **{name: np.array(memory.record(name)[positions]) for name in ("frequencies", "sources", "importance")},
        }

    def layer_stats(self, layer: int) -> dict[str, torch.Tensor]:
        """'ages' (int64) and 'frequencies' (float32) of every slot of a layer, pending ones included,
        `[size + pending]` in position order (no slots read)."""
        parts = [self._layer(layer), self._pending[layer]]
        births = np.concatenate([m.record("births") for m in parts])
        return {
            "ages": torch.from_numpy(self.clock - births),
            "frequencies": torch.from_numpy(np.concatenate([m.record("frequencies") for m in parts])),
        }

    def copy(self) -> LongTermStore:
        """An independent store holding the same slots: what is memory-mapped from saved files is
        shared (never written), the rest copied, so copying a store of any size costs little RAM."""
        twin = LongTermStore(
            self.num_layers, self.hidden_size, self.key_dim,
            dtype=self.dtype, index=self.index_kind, max_slots=self.max_slots, min_slots=self.min_slots,
        )  # fmt: skip
        twin.clock, twin.release_reads, twin.search_settings = self.clock, self.release_reads, self.search_settings
        twin.stm_ages = None if self.stm_ages is None else self.stm_ages.copy()
        twin._layers = [memory.copy() for memory in self._layers]
        twin._pending = [memory.copy() for memory in self._pending]
        twin._tokens, twin.token_search_settings = self._tokens.copy(), self.token_search_settings
        return twin

    # --- persistence (see files.py) ---------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the store to the folder `path`, atomically: a crash mid-save leaves the previous
        store loadable. Afterwards the store reads its slots from the saved files (RAM is freed)."""
        from .files import save_store

        save_store(self, Path(path))

    @classmethod
    def open(cls, path: str | Path, *, mmap: bool = True) -> LongTermStore:
        """Open a store saved with `save`. With mmap (default) nothing big is read: slots, keys and
        records are memory-mapped read-only, and the index file is read at the first search."""
        from .files import open_store

        return open_store(cls, Path(path), mmap=mmap)

    # --- helpers ----------------------------------------------------------------------------
    def _layer(self, layer: int) -> LayerMemory:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is out of range: this store has layers 0..{self.num_layers - 1}")
        return self._layers[layer]

    @staticmethod
    def _check_rows(name: str, tensor: torch.Tensor, width: int, rows: int | None = None) -> int:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.shape[1] != width:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a tensor [k, {width}], got {shape}")
        if rows is not None and tensor.shape[0] != rows:
            raise ValueError(f"{name} has {tensor.shape[0]} rows but slots has {rows}; pass one per slot")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
        return tensor.shape[0]

    @staticmethod
    def _importance(importance, k: int) -> np.ndarray:
        values = torch.as_tensor(importance, dtype=torch.float32).detach().cpu()
        if values.ndim == 0:
            values = values.expand(k)
        if values.shape != (k,):
            raise ValueError(f"importance must be a float or a tensor [{k}], got shape {list(values.shape)}")
        if torch.isnan(values).any() or (values < 0).any():
            raise ValueError("importance must be >= 0 (float('inf') pins a slot), got NaN or a negative value")
        return values.numpy().copy()

    @staticmethod
    def _values(memory: LayerMemory) -> np.ndarray:
        """Recall frequency x importance; +inf for pinned slots, whatever their frequency (inf x 0
        would be NaN, inf x a negative frequency -inf)."""
        importance = memory.record("importance")
        with np.errstate(invalid="ignore", over="ignore"):
            values = memory.record("frequencies") * importance
        return np.where(importance == np.inf, np.inf, values)

    @staticmethod
    def _positions(size: int, indices) -> np.ndarray:
        positions = np.asarray(torch.as_tensor(indices).reshape(-1).cpu())
        if positions.size and not np.issubdtype(positions.dtype, np.integer):
            raise ValueError(f"indices must be integers (positions from search), got {positions.dtype}")
        positions = positions.astype(np.int64)
        bad = positions[(positions < 0) | (positions >= size)]
        if len(bad):
            raise IndexError(f"indices {bad[:5].tolist()} out of range for a layer holding {size} slots")
        return positions

    def _to_numpy(self, slots: torch.Tensor) -> np.ndarray:
        if self.dtype == torch.bfloat16:
            return slots.contiguous().view(torch.int16).numpy().view(np.uint16)
        return slots.contiguous().numpy()


def _live_positions(memory: LayerMemory, ids: np.ndarray) -> np.ndarray:
    """Sorted unique positions of the index's proposed `ids`, minus padding (-1) and tombstones."""
    ids = np.unique(ids[ids >= 0])  # FAISS pads with -1 when it finds fewer than asked
    live = memory.ids
    positions = np.searchsorted(live, ids)  # sorted keys: numpy's binary search reuses its last answer
    found = positions < memory.size
    positions, ids = positions[found], ids[found]
    return positions[live[positions] == ids]  # drops tombstones; sorted and unique like ids
