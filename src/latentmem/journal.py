"""The append-only journal of a memory file: saves that write only what changed (docs/design.md, Compact state).

`<file>.journal` sits next to a state file whose manifest names a journal id. It is a sequence of
records, each

    magic b"LMJR" | meta length u32 | body length u64 | SHA-256 of meta | SHA-256 of body | meta | body

where meta is JSON (what the record holds, and the tensors' names, dtypes and shapes in order) and
body the tensors' bytes. The first record (`kind: "start"`) names the journal id of the base file
it extends; a journal whose id is not the base's is stale (a full save replaced the base after it)
and is ignored. Every later record is one save: the slots dropped since the previous save, the
slots added (with their ages and provenance), how many writes aged the kept ones, the new write
counter, generator state and injection records (persistence.py builds and applies them).

A record is appended with one write and an fsync before the save returns, so an acknowledged save
is on disk. A crash mid-append leaves a torn last record: it fails its length or checksum and is
ignored on reading (it was never acknowledged). A bad record followed by more data is damage, not a
torn append, and raises `MemoryFileError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

MAGIC = b"LMJR"
HEADER = struct.Struct("<4sIQ32s32s")
JOURNAL_FORMAT = "latentmem.memory_journal"
DTYPES = {
    "int8": torch.int8, "int32": torch.int32, "int64": torch.int64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
}  # fmt: skip
MAX_META = 64 * 2**20  # a record's JSON part (injection records of one save): far below this


class JournalError(ValueError):
    """A journal that is damaged (not merely torn at its end)."""


def journal_path(path: Path) -> Path:
    return path.parent / f"{path.name}.journal"


def encode(meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """One record: `meta` plus the tensors (listed in meta as name -> [dtype, shape], in order)."""
    parts, listing = [], {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        listing[name] = [str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]
        parts.append(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    meta_bytes = json.dumps({**meta, "tensors": listing}).encode()
    body = b"".join(parts)
    header = HEADER.pack(
        MAGIC, len(meta_bytes), len(body), hashlib.sha256(meta_bytes).digest(), hashlib.sha256(body).digest()
    )
    return header + meta_bytes + body


def start_record(journal_id: str) -> bytes:
    return encode({"kind": "start", "format": JOURNAL_FORMAT, "journal": journal_id}, {})


def _decode_tensors(meta: dict, body: bytes) -> dict[str, torch.Tensor]:
    tensors, offset = {}, 0
    listing = meta.get("tensors")
    if not isinstance(listing, dict):
        raise JournalError("a record lists no tensors")
    for name, entry in listing.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in DTYPES and isinstance(entry[1], list)):
            raise JournalError(f"a record lists tensor {name!r} as {str(entry)[:100]}")
        dtype, shape = DTYPES[entry[0]], entry[1]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise JournalError(f"a record gives tensor {name!r} the shape {shape}")
        count = 1
        for n in shape:
            count *= n
        size = count * torch.empty(0, dtype=dtype).element_size()
        if offset + size > len(body):
            raise JournalError(f"a record's tensor {name!r} runs past its body")
        raw = bytearray(body[offset : offset + size])
        tensors[name] = (
            (torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8))
            .view(dtype)
            .reshape(shape)
        )
        offset += size
    if offset != len(body):
        raise JournalError("a record's body is longer than its tensors")
    return tensors


class Reader:
    """The records of a journal after its start record, read one at a time (`records`).

    A missing journal, or a stale one (another journal id), has no records. `end`: after `records`
    ran to its end, where the valid records end (None for a missing or stale journal).
    `tensors=False` reads only the headers and metas (checked), skipping the bodies: what the write
    counter and injection records need, without reading slots.
    """

    def __init__(self, path: Path, journal_id: str):
        self.path, self.journal_id, self.end = path, journal_id, None

    def records(self, *, tensors: bool = True):
        self.end = None
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (a generator: closed by the with below)
        except FileNotFoundError:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            position, first = 0, True
            while position < size:
                try:
                    meta, body, end = _read_one(f, position, size, tensors)
                except _Torn:
                    break  # an append that never finished: never acknowledged, ignored
                if first:
                    if meta.get("kind") != "start" or meta.get("format") != JOURNAL_FORMAT:
                        raise JournalError(f"{self.path} does not start with a journal start record")
                    if meta.get("journal") != self.journal_id:
                        return  # stale: written for an earlier base
                    first = False
                else:
                    yield meta, (_decode_tensors(meta, body) if tensors else None)
                position = end
            if not first:  # not even a whole start record: as if absent
                self.end = position


class _Torn(Exception):
    pass


def _read_one(f, position: int, size: int, with_body: bool):
    f.seek(position)
    header = f.read(HEADER.size)
    if len(header) < HEADER.size:
        raise _Torn
    magic, meta_length, body_length, meta_digest, body_digest = HEADER.unpack(header)
    end = position + HEADER.size + meta_length + body_length
    if magic != MAGIC or meta_length > MAX_META:
        if _zeros_from(f, position):  # space allocated but never written (a crash mid-append)
            raise _Torn
        raise JournalError(f"damaged journal record at byte {position}")
    if end > size:
        raise _Torn
    meta_bytes = f.read(meta_length)
    body = f.read(body_length) if with_body else None
    ok = hashlib.sha256(meta_bytes).digest() == meta_digest and (
        body is None or hashlib.sha256(body).digest() == body_digest
    )
    if not ok:
        if end == size:  # the last record: a torn append (its bytes not all written)
            raise _Torn
        raise JournalError(f"journal record at byte {position} fails its checksum")
    try:
        meta = json.loads(meta_bytes)
    except ValueError as err:
        raise JournalError(f"journal record at byte {position} has unreadable meta ({err})") from err
    if not isinstance(meta, dict):
        raise JournalError(f"journal record at byte {position} has malformed meta")
    return meta, body, end


def _zeros_from(f, position: int) -> bool:
    f.seek(position)
    while chunk := f.read(2**20):
        if chunk.count(0) != len(chunk):
            return False
    return True


def append(path: Path, offset: int, record: bytes) -> int:
    """Append `record` at `offset` (the end of the valid records) and fsync; returns the new end."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(record)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    return offset + len(record)
