"""Arrays of one long-term-memory layer that can live in read-only memory-mapped files.

A layer's big arrays (slots `[M, d]`, keys `[M, h]`) must scale past RAM, yet they keep changing:
M+ appends K slots per layer on every write and deletes slots on decay. Rewriting a multi-gigabyte
file on every change would be slow, and writing into a saved file in place would break crash
safety (the saved folder must stay loadable whatever happens). So a `RowTable` is:

- base: the rows of the last save/open, memory-mapped read-only (or a RAM array); never written;
- tail: rows appended since, in RAM (capacity doubles, so appends are amortized O(rows added)).

Rows are addressed by *physical* row numbers (base rows first, then tail rows). Deleting a slot
does not touch a table: the layer drops the row number from its position -> row map and the row
becomes garbage. Tail garbage is reclaimed by `compact_tail`; base garbage by the next save, which
writes only live rows. Trade-off, documented for users: slots added since the last save cost RAM
(`save` spills them to disk and maps them back), and deleted base rows stay on disk until a save.

`Column` is the 1-D counterpart for the small per-slot records (ids, births, frequencies, ...),
indexed by position. An opened column stays memory-mapped until its first change, when it is copied
into RAM (4 to 8 bytes per slot, so even a 1M-slot layer copies only a few MB).
"""

from __future__ import annotations

import mmap
import os
import warnings

import numpy as np
import torch


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array, read-only memory maps included (torch warns about those;
    we never write through these views)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def read_randomly(array: np.ndarray) -> np.ndarray:
    """Tell the kernel that a memory-mapped array is read a few rows at a time, with no readahead:
    reading a retrieved slot then maps a page or two, not a readahead window (measured: 16 random
    rows of a 100 MB file mapped 25 MB of it without this). Returns the array."""
    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return array


def file_identity(array: np.ndarray) -> tuple[str, int, int] | None:
    """(path, device, inode) of the file a memory map reads, to recognise it later; None for RAM arrays."""
    name = getattr(array, "filename", None)
    if not isinstance(array, np.memmap) or name is None:
        return None
    st = os.stat(name)
    return (str(name), st.st_dev, st.st_ino)


class RowTable:
    """Fixed-width rows: a read-only base (often a memory-mapped file) followed by an in-RAM tail."""

    def __init__(self, width: int, dtype: np.dtype, base: np.ndarray | None = None):
        self.width = width
        self.dtype = np.dtype(dtype)
        self.base = np.empty((0, width), self.dtype) if base is None else base
        self.base_file = file_identity(self.base)
        self._tail = np.empty((0, width), self.dtype)
        self.tail_len = 0

    @property
    def base_len(self) -> int:
        return len(self.base)

    def __len__(self) -> int:
        """Physical rows, garbage included."""
        return self.base_len + self.tail_len

    def append(self, rows: np.ndarray) -> int:
        """Append rows `[k, width]` to the tail; returns the physical row number of the first one."""
        first = len(self)
        need = self.tail_len + len(rows)
        if need > len(self._tail):
            grown = np.empty((max(need, 2 * len(self._tail), 1024), self.width), self.dtype)
            grown[: self.tail_len] = self._tail[: self.tail_len]
            self._tail = grown
        self._tail[self.tail_len : need] = rows
        self.tail_len = need
        return first

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows at physical numbers `rows` (strictly increasing). A contiguous run within the base or
        the tail comes back as a view without copying; anything else is gathered."""
        if len(rows) == 0:
            return np.empty((0, self.width), self.dtype)
        start, stop, base = int(rows[0]), int(rows[-1]) + 1, self.base_len
        if stop - start == len(rows):
            if stop <= base:
                return self.base[start:stop]
            if start >= base:
                return self._tail[start - base : stop - base]
        return self.gather(rows)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows at physical numbers `rows` (any order), copied. Sorted requests read a memory map in
        file order, which is what the callers arrange."""
        if len(rows) == 0 or rows.max() < self.base_len:
            return np.take(self.base, rows, axis=0)
        if rows.min() >= self.base_len:
            return np.take(self._tail, rows - self.base_len, axis=0)
        out = np.empty((len(rows), self.width), self.dtype)
        in_base = rows < self.base_len
        out[in_base] = self.base[rows[in_base]]
        out[~in_base] = self._tail[rows[~in_base] - self.base_len]
        return out

    def compact_tail(self, live_tail_rows: np.ndarray) -> None:
        """Keep only the tail rows numbered `live_tail_rows` (tail-relative, increasing), in order."""
        kept = self._tail[live_tail_rows]
        self._tail, self.tail_len = kept, len(kept)

    def is_base_file(self, rows: np.ndarray) -> bool:
        """Whether the live rows are exactly the base file's rows, unchanged: a save may then reuse
        (hard-link) the file instead of rewriting it. The file must still be the one we mapped."""
        if self.base_file is None or self.tail_len or len(rows) != self.base_len:
            return False
        if len(rows) and (rows[0] != 0 or rows[-1] != self.base_len - 1):  # rows increase strictly
            return False
        try:
            st = os.stat(self.base_file[0])
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.base_file[1:]

    def copy(self) -> RowTable:
        """A table with the same rows: the base (never written) is shared, the tail copied."""
        twin = RowTable(self.width, self.dtype, self.base)
        twin.base_file = self.base_file
        twin._tail, twin.tail_len = self._tail[: self.tail_len].copy(), self.tail_len
        return twin

    def rebase(self, base: np.ndarray) -> None:
        """Continue from `base` (the rows just saved, in position order): the tail is emptied."""
        self.base, self.base_file = base, file_identity(base)
        self._tail, self.tail_len = np.empty((0, self.width), self.dtype), 0


class Column:
    """A growable 1-D array indexed by slot position; copy-on-write if it starts memory-mapped."""

    def __init__(self, dtype: np.dtype, data: np.ndarray | None = None):
        self._buf = np.empty(0, dtype) if data is None else data
        self._len = len(self._buf)

    def __len__(self) -> int:
        return self._len

    @property
    def values(self) -> np.ndarray:
        """The live values (a view; read-only while the column is still memory-mapped)."""
        return self._buf[: self._len]

    def copy(self) -> Column:
        """A column with the same values, sharing its buffer: the buffer becomes read-only, so either
        column copies it at its first change (as a memory-mapped one always does)."""
        self._buf.setflags(write=False)
        return Column(self._buf.dtype, self.values)

    def mutable(self) -> np.ndarray:
        """The live values, writable (copies a memory-mapped column into RAM on first use)."""
        if isinstance(self._buf, np.memmap) or not self._buf.flags.writeable:
            self._buf = np.array(self.values)
        return self._buf[: self._len]

    def append(self, values: np.ndarray) -> None:
        need = self._len + len(values)
        if need > len(self._buf) or isinstance(self._buf, np.memmap) or not self._buf.flags.writeable:
            grown = np.empty(max(need, 2 * len(self._buf), 1024), self._buf.dtype)
            grown[: self._len] = self.values
            self._buf = grown
        self._buf[self._len : need] = values
        self._len = need

    def keep(self, mask: np.ndarray) -> None:
        """Drop the positions where `mask` is False, keeping the order of the rest."""
        self._buf = self.values[mask]
        self._len = len(self._buf)
