"""An official M+ checkpoint's long-term memory, streamed between safetensors files and a store.

The release saves long-term memory as model tensors (`ltm.{i}` [M, d], `ltm_keys.{i}` [M, h],
`ltm_recall_frequencies.{i}` [M], `ltm_ages.{i}` [M], all in the model dtype: mplus-8b holds ~150k
slots per layer, ~40 GB in bfloat16). Loading them like weights would need all of that in RAM, so:

- `read_layout` reads only the shards' JSON headers (where each tensor's bytes are);
- `stream_into_store` copies each layer's slots and keys, a bounded chunk of rows at a time with
  plain file reads (no memory map, so the pages read never count as the process's memory), into
  `.npy` files of a store folder, which the store then memory-maps (store format: files.py);
- `write_safetensors` writes a safetensors file whose large tensors come as chunks (e.g. read from
  a memory-mapped store), so saving back never holds them whole either.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .layer import LayerMemory
from .release import integral_ages
from .table import Column, RowTable, read_randomly

# safetensors dtype names <-> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
CHUNK_BYTES = 8 << 20  # bytes read or written per step


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, self.shape[0]) if self.shape else self.nbytes


def read_header(file: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file, from its header alone."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which latentmem cannot read")
        begin, end = info["data_offsets"]
        entries[name] = Entry(file, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin, end - begin)
    return entries


def read_rows(entry: Entry, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows start..stop-1 of a tensor (all of a 0-d one), read with a plain file read."""
    stop = (entry.shape[0] if entry.shape else 1) if stop is None else stop
    with open(entry.file, "rb") as f:
        f.seek(entry.start + start * entry.row_bytes)
        data = bytearray(f.read((stop - start) * entry.row_bytes))
    if len(data) != (stop - start) * entry.row_bytes:
        raise ValueError(f"{entry.file} is truncated: a tensor's bytes run past its end")
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(entry.dtype).reshape((stop - start, *entry.shape[1:]) if entry.shape else ())


def chunks_of(entry: Entry) -> Iterator[torch.Tensor]:
    """A 2-D tensor, a bounded number of rows at a time."""
    step = max(1, CHUNK_BYTES // max(1, entry.row_bytes))
    for start in range(0, entry.shape[0], step):
        yield read_rows(entry, start, min(entry.shape[0], start + step))


# --- loading -------------------------------------------------------------------------------------
LTM_TENSORS = ("ltm", "ltm_keys", "ltm_recall_frequencies", "ltm_ages")


def layers_of(entries: dict[str, Entry], name: str) -> list[Entry]:
    """`name.0`, `name.1`, ... in layer order (checked to be complete)."""
    found = {int(k.rsplit(".", 1)[1]): v for k, v in entries.items() if k.rsplit(".", 1)[0] == name and k.rsplit(".", 1)[1].isdigit()}
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"checkpoint has {name}.{{i}} for layers {sorted(found)}; expected 0..{len(found) - 1}")
    return [found[i] for i in range(len(found))]


def stream_into_store(store, entries: dict[str, Entry], folder: Path) -> None:
    """Fill `store` (empty) with an official checkpoint's long-term memory, layer by layer: slots and
    keys stream into `.npy` files under `folder` and are memory-mapped from there; ages (rounded to
    integers) and recall frequencies are read whole (a few bytes per slot)."""
    per_name = {name: layers_of(entries, name) for name in LTM_TENSORS}
    if any(len(layers) != store.num_layers for layers in per_name.values()):
        counts = {name: len(layers) for name, layers in per_name.items()}
        raise ValueError(f"checkpoint has long-term memory for {counts} layers, model has {store.num_layers}")
    for i in range(store.num_layers):
        slots, keys, frequencies, ages = (per_name[name][i] for name in LTM_TENSORS)
        size = slots.shape[0] if slots.shape else -1
        expected = {"ltm": (size, store.hidden_size), "ltm_keys": (size, store.key_dim),
                    "ltm_recall_frequencies": (size,), "ltm_ages": (size,)}  # fmt: skip
        for name, entry in zip(LTM_TENSORS, (slots, keys, frequencies, ages)):
            if entry.shape != expected[name]:
                raise ValueError(f"{name}.{i} has shape {list(entry.shape)}, expected {list(expected[name])}")
        layer_folder = folder / f"layer_{i:03d}"
        layer_folder.mkdir(parents=True, exist_ok=True)
        memory: LayerMemory = store._layers[i]
        to_slots = lambda rows: store._to_numpy(rows.to(store.dtype))  # noqa: E731
        slot_file = _stream_npy(slots, layer_folder / "slots.npy", memory.slots.dtype, to_slots)
        memory.slots = RowTable(store.hidden_size, memory.slots.dtype, read_randomly(slot_file))
        memory.keys = RowTable(store.key_dim, np.float32, _stream_npy(keys, layer_folder / "keys.npy", np.float32, _finite_keys(i)))
        frequency_values = read_rows(frequencies).double()
        if not torch.isfinite(frequency_values).all():
            raise ValueError(f"ltm_recall_frequencies.{i} holds non-finite values")
        memory.rows = Column(np.int64, np.arange(size, dtype=np.int64))
        memory.records = {
            "ids": Column(np.int64, np.arange(size, dtype=np.int64)),
            "births": Column(np.int64, store.clock - integral_ages(read_rows(ages), f"ltm_ages.{i}")),
            "frequencies": Column(np.float32, frequency_values.float().numpy()),
            "sources": Column(np.int64, np.full(size, -1, np.int64)),  # EXTERNAL: no injection of this state
            "importance": Column(np.float32, np.ones(size, np.float32)),
        }
        memory.next_id = size


def _finite_keys(layer: int) -> Callable[[torch.Tensor], np.ndarray]:
    def convert(rows: torch.Tensor) -> np.ndarray:
        rows = rows.float()
        if not torch.isfinite(rows).all():
            raise ValueError(f"ltm_keys.{layer} holds NaN or inf; it would poison every search of layer {layer}")
        return rows.numpy()

    return convert


def _stream_npy(entry: Entry, dst: Path, dtype, convert: Callable[[torch.Tensor], np.ndarray]) -> np.ndarray:
    """Write a 2-D tensor to `dst` as `.npy` (converted chunk by chunk), then memory-map it."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": entry.shape}
    with open(dst, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for rows in chunks_of(entry):
            f.write(np.ascontiguousarray(convert(rows), dtype=dtype).reshape(-1).view(np.uint8))
        f.flush()
        # Written pages stay cached as large blocks, and a read of one row through the memory map
        # would then map a whole block: write them out and drop them, so later reads fetch pages.
        os.fdatasync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return np.load(dst, mmap_mode="r")


# --- saving --------------------------------------------------------------------------------------
@dataclass
class Chunked:
    """A tensor too large to hold whole: its dtype, shape and a function yielding its rows in order."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor | Chunked], metadata: dict | None = None) -> None:
    """Write a safetensors file (readable by `safetensors.torch.load_file`), streaming `Chunked` ones."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        shape = tuple(tensor.shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=tensor.dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, tensor in tensors.items():
            written = 0
            parts = tensor.chunks() if isinstance(tensor, Chunked) else [tensor]
            for part in parts:
                part = part.detach().to("cpu", tensor.dtype).contiguous()
                data = part.reshape(-1).view(torch.uint8).numpy() if part.numel() else b""
                f.write(data)
                written += part.numel() * part.element_size()
            if written != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise ValueError(f"tensor {name!r}: its chunks hold {written} bytes, its shape needs more or fewer")
