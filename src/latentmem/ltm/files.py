"""Saving and opening a LongTermStore: a folder of `.npy` arrays, swapped in atomically.

    path/manifest.json              format, shapes, dtype, index kind, budgets, write clock, per-layer sizes
    path/layer_000/slots.npy        [M, d] float16 / float32, or bfloat16 bits as uint16
                   keys.npy         [M, h] float32
                   ids.npy births.npy frequencies.npy sources.npy importance.npy   [M] each
                   index.faiss      the layer's approximate index, if one was built (read at first search)
                   pending/         slots evicted but not yet merged (release.py), the same files
    path/stm_ages.npy               [L, N] int64, the release's age of each short-term slot (if kept)

A save writes everything into a temporary folder next to `path`, fsyncs it, then swaps it in with
two renames: `path` -> `.{name}.old`, temp -> `path`, then deletes the old one. A crash before the
first rename leaves `path` untouched; between the renames `path` is missing and `open` reads the
intact `.{name}.old` instead; after the second, `path` is the new store. Files of a store are never
written after their save, so a store opened memory-mapped may keep reading them while it changes,
and a later save hard-links the unchanged big files instead of copying them.

`open` reads only the manifest and the `.npy` headers (shape/dtype are checked against the
manifest; a truncated file fails to map): opening a store of any size takes milliseconds and
reads no slots. The data itself is not checksummed, since that would mean reading all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .layer import LayerMemory
from .table import Column, RowTable, read_randomly

if TYPE_CHECKING:
    from .store import LongTermStore

FORMAT = "latentmem.long_term_store"
FORMAT_VERSION = 3  # 2: pending slots, release_reads, stm_ages (1 is read as having none); 3: token keys
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
COPY_CHUNK = 65536  # rows copied per step when writing a table (bounded memory for any size)
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class LTMFileError(ValueError):
    """A long-term store folder that cannot be opened: missing, foreign, corrupted or truncated."""


# --- save --------------------------------------------------------------------------------------
def save_store(store: LongTermStore, path: Path) -> None:
    if path.exists() and not (path / MANIFEST).is_file():
        raise LTMFileError(f"{path} exists and is not a long-term store; refusing to replace it (choose another path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, replacement_mode(path, 0o777))  # mkdtemp makes it 0700; match what it replaces, or the umask
        layers = [_write_layer(memory, tmp / f"layer_{i:03d}") for i, memory in enumerate(store._layers)]
        pending = [_write_layer(memory, tmp / f"layer_{i:03d}" / "pending") for i, memory in enumerate(store._pending)]
        if store.stm_ages is not None:
            _write_array(tmp / "stm_ages.npy", np.ascontiguousarray(store.stm_ages, dtype=np.int64))
        tokens = _write_layer(store._tokens, tmp / "tokens") if store._tokens.size else None
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_layers": store.num_layers,
            "hidden_size": store.hidden_size,
            "key_dim": store.key_dim,
            "dtype": DTYPE_NAMES[store.dtype],
            "index": store.index_kind,
            "max_slots": store.max_slots,
            "min_slots": store.min_slots,
            "clock": store.clock,
            "layers": layers,
            "pending": pending,
            "release_reads": store.release_reads,
            "stm_ages": store.stm_ages is not None,
            "tokens": tokens,  # None: no token keys (stores saved before they existed have no entry)
        }
        manifest["manifest_checksum"] = _manifest_checksum(manifest)
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        folders = [tmp / f"layer_{i:03d}" / part for i in range(store.num_layers) for part in ("pending", "")]
        for folder in folders + ([tmp / "tokens"] if tokens else []) + [tmp]:
            fsync_dir(folder)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Continue from the saved files: the big tables are now read from disk, not held in RAM.
    saved = [(memory, path / f"layer_{i % store.num_layers:03d}" / ("pending" if i >= store.num_layers else ""))
             for i, memory in enumerate(store._layers + store._pending)]  # fmt: skip
    if tokens:
        saved.append((store._tokens, path / "tokens"))
    for memory, folder in saved:
        memory.slots.rebase(read_randomly(np.load(folder / "slots.npy", mmap_mode="r")))
        memory.keys.rebase(np.load(folder / "keys.npy", mmap_mode="r"))
        memory.rows = Column(np.int64, np.arange(memory.size, dtype=np.int64))
        if memory.index is not None and memory.index.file is not None:
            memory.index.file = folder / INDEX_FILE


def _write_layer(memory: LayerMemory, folder: Path) -> dict:
    folder.mkdir()
    rows = memory.rows.values
    _write_table(memory.slots, rows, folder / "slots.npy")
    _write_table(memory.keys, rows, folder / "keys.npy")
    for name, column in memory.records.items():
        _write_array(folder / f"{name}.npy", np.ascontiguousarray(column.values))
    entry = {"size": memory.size, "next_id": memory.next_id, "index": None}
    if memory.index is not None and memory.index.write(folder / INDEX_FILE):
        _fsync_file(folder / INDEX_FILE)
        entry["index"] = {"indexed_upto": memory.index.indexed_upto, "trained_size": memory.index.trained_size}
    return entry


def _write_table(table: RowTable, rows: np.ndarray, dst: Path) -> None:
    """Write the live rows of `table` in position order (streamed, so any size fits in memory)."""
    if table.is_base_file(rows) and _try_link(Path(table.base_file[0]), dst):
        return
    if len(rows) == 0:
        _write_array(dst, np.empty((0, table.width), table.dtype))
        return
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=table.dtype, shape=(len(rows), table.width))
    for start in range(0, len(rows), COPY_CHUNK):
        out[start : start + COPY_CHUNK] = table.read(rows[start : start + COPY_CHUNK])
    out.flush()
    del out
    _fsync_file(dst)


def _write_array(dst: Path, array: np.ndarray) -> None:
    with open(dst, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _write_file(dst: Path, data: bytes) -> None:
    with open(dst, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _try_link(src: Path, dst: Path) -> bool:
    # Saved files are never modified, so two stores may share one by hard link.
    try:
        os.link(src, dst)
        return True
    except OSError:  # another file system, or links unsupported: the caller copies
        return False


def link_or_copy(src: Path, dst: Path) -> None:
    if not _try_link(src, dst):
        shutil.copyfile(src, dst)


def _swap_in(tmp: Path, path: Path) -> None:
    backup = _backup(path)
    if path.exists():
        if backup.exists():  # left by an earlier interrupted save; `path` is complete, so drop it
            shutil.rmtree(backup)
        os.rename(path, backup)
        fsync_dir(path.parent)
    # From here until the next rename, `path` is missing and `open` falls back to `backup`.
    os.rename(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(backup, ignore_errors=True)


def replacement_mode(path: Path, default: int) -> int:
    """Permissions for a file or folder about to replace `path`: those of `path`, else `default`
    less the umask (what a plain create would give; temp files start private)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    # Reading the umask means setting it: set a strict one meanwhile, so a racing thread's files
    # come out too private rather than too open.
    umask = os.umask(0o077)
    os.umask(umask)
    return default & ~umask


def _backup(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True, mode: int | None = None) -> None:
    """Write `data` to `path` whole or not at all: a temporary file beside it, then a rename.

    `durable`: fsync the file before the rename and the folder after it (a crash keeps either the
    old or the new file, never neither). `mode`: the file's permissions (mkstemp creates 0600).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    # Make renames and new entries durable. Best effort: some systems cannot fsync a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _manifest_checksum(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != "manifest_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# --- open --------------------------------------------------------------------------------------
def open_store(cls: type[LongTermStore], path: Path, *, mmap: bool = True) -> LongTermStore:
    if not (path / MANIFEST).is_file():
        if (_backup(path) / MANIFEST).is_file():
            path = _backup(path)  # a save was interrupted between its renames: the old store is here
        else:
            raise FileNotFoundError(f"no long-term store at {path} (no {MANIFEST})")
    manifest = _read_manifest(path)
    dtype = {name: dtype for dtype, name in DTYPE_NAMES.items()}[manifest["dtype"]]
    store = cls(
        manifest["num_layers"], manifest["hidden_size"], manifest["key_dim"],
        dtype=dtype, index=manifest["index"], max_slots=manifest["max_slots"], min_slots=manifest["min_slots"],
    )  # fmt: skip
    store.clock = manifest["clock"]
    for i, (memory, entry) in enumerate(zip(store._layers, manifest["layers"])):
        _open_layer(memory, entry, path / f"layer_{i:03d}", mmap)
    for i, (memory, entry) in enumerate(zip(store._pending, manifest.get("pending", []))):
        _open_layer(memory, entry, path / f"layer_{i:03d}" / "pending", mmap)
    store.release_reads = manifest.get("release_reads", False)
    if manifest.get("stm_ages"):
        store.stm_ages = np.load(path / "stm_ages.npy")
    if manifest.get("tokens"):
        _open_layer(store._tokens, manifest["tokens"], path / "tokens", mmap)
    return store


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise LTMFileError(f"{path} has no readable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LTMFileError(f"{path} is not a latentmem long-term store")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LTMFileError(f"{path} has format version {version!r}; this latentmem reads up to {FORMAT_VERSION}")
    if manifest.get("manifest_checksum") != _manifest_checksum(manifest):
        raise LTMFileError(f"{path} is corrupted: manifest checksum mismatch")
    layers = manifest.get("layers")
    if (
        manifest.get("dtype") not in DTYPE_NAMES.values()
        or not isinstance(layers, list)
        or len(layers) != manifest.get("num_layers")
    ):
        raise LTMFileError(
            f"{path} has a malformed manifest (dtype {manifest.get('dtype')!r}, {manifest.get('num_layers')!r} layers)"
        )
    return manifest


def _open_layer(memory: LayerMemory, entry: dict, folder: Path, mmap: bool) -> None:
    n = entry["size"]
    expected = {
        "slots": ((n, memory.slots.width), memory.slots.dtype),
        "keys": ((n, memory.keys.width), memory.keys.dtype),
        **{name: ((n,), np.dtype(dtype)) for name, dtype in LayerMemory.RECORDS.items()},
    }
    arrays = {}
    for name, (shape, dtype) in expected.items():
        file = folder / f"{name}.npy"
        try:
            array = np.load(file, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as err:  # missing, truncated (cannot map) or not an .npy file
            raise LTMFileError(f"{file} cannot be read ({err}); the store is incomplete or corrupted") from err
        if array.shape != shape or array.dtype != dtype:
            raise LTMFileError(f"{file} is {list(array.shape)} {array.dtype}, the manifest says {list(shape)} {dtype}")
        arrays[name] = array
    memory.slots = RowTable(memory.slots.width, memory.slots.dtype, read_randomly(arrays["slots"]))
    memory.keys = RowTable(memory.keys.width, memory.keys.dtype, arrays["keys"])
    memory.rows = Column(np.int64, np.arange(n, dtype=np.int64))
    memory.records = {name: Column(dtype, arrays[name]) for name, dtype in LayerMemory.RECORDS.items()}
    memory.next_id = entry["next_id"]
    if memory.index is not None and entry["index"] is not None:
        memory.index.file = folder / INDEX_FILE
        memory.index.indexed_upto = entry["index"]["indexed_upto"]
        memory.index.trained_size = entry["index"]["trained_size"]
