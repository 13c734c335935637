"""One layer's long-term memory: its slots, keys and per-slot records, in insertion order.

Positions (0..size-1) are what the public API speaks: insertion order, oldest first, and deleting
slots keeps the order of the rest (M+ places retrieved slots oldest first). Behind positions:
- `rows`: position -> physical row in the `slots`/`keys` tables (strictly increasing; see table.py);
- `ids`: position -> stable slot id (strictly increasing, never reused), so a vector index can name
  slots across deletions: `np.searchsorted(ids, id)` turns an id back into a position.
Ages are not stored per slot but as birth times on the store's write clock (age = clock - birth),
so "every write ages every slot" is one addition instead of a pass over every layer.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .index import ApproximateIndex
from .table import Column, RowTable

COMPACT_MIN_ROWS = 4096  # tail garbage tolerated before compacting (avoids churn on small layers)


class LayerMemory:
    """Slots, keys and records of one layer (no validation here: LongTermStore checks its input)."""

    # Per-slot records, indexed by position; `ids` and `births` are explained in the module doc.
    RECORDS: ClassVar[dict[str, type]] = {
        "ids": np.int64, "births": np.int64, "frequencies": np.float32, "sources": np.int64, "importance": np.float32,
    }  # fmt: skip

    def __init__(self, hidden_size: int, key_dim: int, slot_dtype: np.dtype, index_kind: str):
        self.slots = RowTable(hidden_size, slot_dtype)
        self.keys = RowTable(key_dim, np.float32)
        self.rows = Column(np.int64)
        self.records = {name: Column(dtype) for name, dtype in self.RECORDS.items()}
        self.next_id = 0
        self.index = ApproximateIndex(index_kind, key_dim) if index_kind != "exact" else None

    # --- views ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> np.ndarray:
        return self.records["ids"].values

    def record(self, name: str) -> np.ndarray:
        return self.records[name].values

    def keys_at(self, positions: np.ndarray) -> np.ndarray:
        """Keys `[len(positions), h]` of increasing positions (read in file order)."""
        return self.keys.read(self.rows.values[positions])

    def keys_at_range(self, start: int, stop: int) -> np.ndarray:
        """Keys of positions start..stop-1: a view when they are stored contiguously."""
        return self.keys.read(self.rows.values[start:stop])

    def slots_at(self, positions: np.ndarray) -> np.ndarray:
        return self._gather(self.slots, positions)

    def _gather(self, table: RowTable, positions: np.ndarray) -> np.ndarray:
        # Read in file order (sorted rows), then restore the caller's order.
        rows = self.rows.values[positions]
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), table.width), table.dtype)
        out[order] = table.gather(rows[order])
        return out

    def gather_keys(self, positions: np.ndarray) -> np.ndarray:
        return self._gather(self.keys, positions)

    def copy(self) -> LayerMemory:
        """An independent layer with the same slots (memory-mapped tables shared, see RowTable.copy)."""
        twin = object.__new__(LayerMemory)
        twin.slots, twin.keys, twin.rows = self.slots.copy(), self.keys.copy(), self.rows.copy()
        twin.records = {name: column.copy() for name, column in self.records.items()}
        twin.next_id = self.next_id
        twin.index = None if self.index is None else self.index.copy()
        return twin

    # --- changes --------------------------------------------------------------------------
    def append(self, slots: np.ndarray, keys: np.ndarray, records: dict[str, np.ndarray]) -> None:
        k = len(slots)
        first = self.slots.append(slots)
        self.keys.append(keys)
        self.rows.append(np.arange(first, first + k, dtype=np.int64))
        self.records["ids"].append(np.arange(self.next_id, self.next_id + k, dtype=np.int64))
        self.next_id += k
        for name, values in records.items():
            self.records[name].append(values)

    def keep(self, mask: np.ndarray) -> int:
        """Delete the positions where `mask` is False (order of the rest kept); returns how many."""
        removed = int(self.size - np.count_nonzero(mask))
        if removed == 0:
            return 0
        self.rows.keep(mask)
        for column in self.records.values():
            column.keep(mask)
        self._compact_tail()
        return removed

    def _compact_tail(self) -> None:
        rows = self.rows.values
        first_tail = int(np.searchsorted(rows, self.slots.base_len))
        live_tail = len(rows) - first_tail
        garbage = self.slots.tail_len - live_tail
        if garbage > max(live_tail, COMPACT_MIN_ROWS):
            tail_rows = rows[first_tail:] - self.slots.base_len
            self.slots.compact_tail(tail_rows)
            self.keys.compact_tail(tail_rows)
            self.rows.mutable()[first_tail:] = self.slots.base_len + np.arange(live_tail)
