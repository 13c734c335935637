"""Saving and loading a MemoryState: one `.safetensors` file, written atomically.

The file holds the tensors (`stm`, `ages`, `sources`) and, in its header metadata, a JSON manifest:
format version, model fingerprint, shapes, dtype, the generator state, the write counter, the
injection records, a SHA-256 checksum of the tensor bytes and one of the manifest itself. A save
goes to a temporary file in the same folder that is flushed to disk and then renamed over the
target, so a crash mid-save leaves the previous file intact; the file gets the permissions of the
file it replaces (or the umask's, for a new one). Loading checks everything before returning: a
truncated, corrupted or foreign file raises `MemoryFileError` and never yields partial memory, and
the loaded tensors are copies (they never alias the file, which may change after loading).

Files may come from anyone (a server imports uploads), and a checksum is no signature: a forged
file can carry correct ones. So every field is checked for what it must be, not only for damage:
counts are non-negative ints, timestamps finite, provenance ids name recorded injections, the
pool is finite, and, with a model, shape and dtype are the model's. An M+ state names its
long-term store by a generation id only (12 hex digits), always resolved next to the file as
`<file name>.ltm-<id>`: a manifest cannot point anywhere else on the disk.

Two opt-in options (docs/design.md, Compact per-user state): `slot_dtype="int8"` stores the slots as
int8 codes with a float32 scale each (`stm_q`, `stm_scale`; quantize.py), and `journal=True` makes a
save after writes append only what changed to `<file name>.journal` (journal.py), named by a
journal id in the manifest and, like the long-term store, always resolved next to the file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from . import journal as jr
from .ltm.files import fsync_dir, replacement_mode, write_atomic
from .pool import tile_to_fill, tiled_from
from .quantize import dequantize_pool, quantize_pool, quantize_rows
from .state import EXTERNAL, Injection, MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM

FORMAT = "latentmem.memory_state"
# 2: int8 slots (`slots: "int8"`) and a journal (`journal: <id>`); 3: a pool stored as one copy of its
# tiled first write (`tiled: <slots per copy>`). Each file is written with the lowest version it needs.
FORMAT_VERSION = 3
TENSORS = ("stm", "ages", "sources")
INT8_TENSORS = ("stm_q", "stm_scale", "ages", "sources")  # slot codes [L, N, d] int8, scales [L, N] float32
SLOT_DTYPES = (None, "int8")  # how slots are stored: the state's dtype, or int8 codes + a scale per slot
JOURNAL_LIMIT = 2.0  # a journal longer than this many times its base file is compacted into a new base
# Manifest fields a version-1 file must have, with their JSON types.
REQUIRED = {
    "fingerprint": str, "shape": list, "dtype": str, "seed": int, "generator_state": str,
    "initialized": bool, "write_count": int, "injections": list, "checksum": str, "manifest_checksum": str,
}  # fmt: skip
# An injection record's fields; the optional ones are absent from files written before they existed
# (distinct_tokens: the token ids a focused read ranks by, null for models that read the whole pool).
RECORD = {"id": int, "source": str, "tokens": int, "timestamp": (int, float), "importance": (int, float),
          "distinct_tokens": (list, type(None))}  # fmt: skip
OPTIONAL_RECORD = {"importance": 1.0, "distinct_tokens": None}
DTYPES = ("float16", "bfloat16", "float32", "float64")
GENERATION = re.compile(r"[0-9a-f]{12}")  # a long-term store's generation id
MAX_INT = 2**63 - 1  # counters and ids are int64 in tensors and in the server's index


class MemoryFileError(ValueError):
    """A memory file that cannot be loaded: truncated, corrupted, foreign or for another model."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in INT8_TENSORS if "stm_q" in tensors else TENSORS:
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())  # the array itself: no copy
    return digest.hexdigest()


def _manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest (all fields but this one): the generator state, write counter and
    injection records are not covered by the tensor checksum, and a flipped digit there still parses."""
    body = {key: value for key, value in manifest.items() if key != "manifest_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_state(
    state: MemoryState,
    path: str | Path,
    *,
    slot_dtype: str | None = None,
    journal: bool = False,
    journal_limit: float = JOURNAL_LIMIT,
) -> None:
    """Save `state` to `path` atomically (docs/design.md, Persistence and Compact state).

    `slot_dtype="int8"`: store the short-term slots as int8 codes with a float32 scale per slot
    (lossy: `quantize.py`; about half the bytes of bfloat16); loading gives the state's dtype back.
    `journal=True`: when this state was last saved to (or loaded from) `path` and has only been
    written since, append the change (the slots dropped and added, counters, records) to
    `<path>.journal` instead of rewriting the file; the journal is folded into a new base file
    (compaction) once it would exceed `journal_limit` times the base. Any other save rewrites the file
    and starts over (a file saved without `journal` has none).
    """
    path = Path(path)
    if slot_dtype not in SLOT_DTYPES:
        raise ValueError(f"slot_dtype must be one of {SLOT_DTYPES}, got {slot_dtype!r}")
    if journal and _append(state, path, slot_dtype, journal_limit):
        return
    _save_whole(state, path, slot_dtype, journal)


def _save_whole(state: MemoryState, path: Path, slot_dtype: str | None, journal: bool) -> None:
    # A pool that is still its first write tiled N/k times (or still empty) is stored as one copy:
    # a new session's first save writes k slots per layer, not N.
    period = _tile_period(state)
    stored = slice(None) if period is None else slice(0, period)
    stm = state.stm[:, stored].detach()
    if slot_dtype == "int8":
        codes, scales = quantize_pool(stm)
        tensors = {"stm_q": codes, "stm_scale": scales}
    else:
        tensors = {"stm": stm.contiguous().cpu()}
    tensors.update(ages=state.ages[:, stored].contiguous(), sources=state.sources[:, stored].contiguous())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if period is not None else 2 if (slot_dtype or journal) else 1,
        "fingerprint": state.fingerprint,
        "shape": list(state.shape),
        "dtype": str(state.dtype).removeprefix("torch."),
        "seed": state.seed,
        "generator_state": _generator_state(state),
        "initialized": state.initialized,
        "write_count": state.write_count,
        "injections": [asdict(i) for i in state.injections.values()],
        "checksum": _checksum(tensors),
    }
    if slot_dtype:
        manifest["slots"] = slot_dtype
    if period is not None:
        manifest["tiled"] = period
    if journal:
        manifest["journal"] = uuid.uuid4().hex[:12]
    if state.ltm is not None:
        # Long-term memory is a folder of (memory-mapped) arrays. Each save writes a new generation
        # next to the file and the file names it, so the rename of the file is the one commit point:
        # a crash before it leaves the old file naming the old, complete generation.
        manifest["ltm"] = _save_ltm(state, path)
    manifest["manifest_checksum"] = _manifest_checksum(manifest)
    payload = save_bytes(tensors, metadata={"manifest": json.dumps(manifest)})
    path.parent.mkdir(parents=True, exist_ok=True)
    if getattr(state, "_journal", None) is not None and state._journal.path == path:
        state._journal = None  # this file is being replaced: nothing to append to until the save is done
    try:  # the mode of the file it replaces, or the umask's (mkstemp would make it 0600)
        write_atomic(path, payload, mode=replacement_mode(path, 0o666))  # fsynced, and the rename too
    except BaseException:
        if "ltm" in manifest:
            shutil.rmtree(ltm_path(path, manifest["ltm"]), ignore_errors=True)
        raise
    # The new file names another journal id (or none): the old journal is stale from the rename on.
    _remove_journal(path)
    _remove_stale_generations(path, keep=manifest.get("ltm"))
    if journal:
        state._journal = _Cursor.after(state, path, manifest["journal"], 0, 0, slot_dtype)


def _tile_period(state: MemoryState) -> int | None:
    """Slots per copy if the pool, its ages and provenance are a tiling of their first slots (an
    empty pool: of one zero slot), else None; checked in place, whatever the state believes."""
    period = state.tile_period if state.initialized else 1
    if period is None or period >= state.num_slots:
        return None
    tiled = all(tiled_from(t, period) for t in (state.stm, state.ages, state.sources))
    return period if tiled else None


def pool_bytes(shape: tuple[int, int, int], dtype: torch.dtype, slot_dtype: str | None = None) -> int:
    """The tensor bytes of a whole (untiled) state file of `shape` [L, N, d]: the slots in `dtype`
    (or int8 codes and a float32 scale each) and every slot's int64 age and provenance."""
    L, N, d = shape
    per_slot = d + 4 if slot_dtype == "int8" else d * dtype.itemsize
    return L * N * (per_slot + 16)


def _generator_state(state: MemoryState) -> str:
    return base64.b64encode(state.generator.get_state().numpy().tobytes()).decode()


def _save_ltm(state: MemoryState, path: Path) -> str:
    generation = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    state.ltm.save(ltm_path(path, generation))
    return generation


def _remove_journal(path: Path) -> None:
    try:
        jr.journal_path(path).unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


@dataclass
class _Cursor:
    """What a state last saved to (or loaded from) a journaled file: enough to append only the change."""

    path: Path
    journal_id: str
    base: tuple  # (inode, size, mtime) of the base file: another save to the path changes it
    base_bytes: int
    offset: int  # where the journal's valid records end (0: no journal file yet)
    seq: int  # records so far
    slot_dtype: str | None
    version: int  # the state's version when saved: `slot_origins` says what moved since
    write_count: int
    injections: int
    ages: torch.Tensor
    sources: torch.Tensor

    @classmethod
    def after(cls, state, path, journal_id, offset, seq, slot_dtype) -> _Cursor:
        stat = os.stat(path)
        base_bytes = max(stat.st_size, pool_bytes(state.shape, state.dtype, slot_dtype))  # a tiled base is smaller
        return cls(
            path, journal_id, _identity(stat), base_bytes, offset, seq, slot_dtype, state.version,
            state.write_count, len(state.injections), state.ages.clone(), state.sources.clone(),
        )  # fmt: skip


def _identity(stat: os.stat_result) -> tuple:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _append(state: MemoryState, path: Path, slot_dtype: str | None, limit: float) -> bool:
    """Save by appending one journal record; False (nothing written) when only a whole save will do."""
    cursor = getattr(state, "_journal", None)
    if cursor is None or cursor.path != path or cursor.slot_dtype != slot_dtype or not state.initialized:
        return False
    try:
        if _identity(os.stat(path)) != cursor.base:
            return False  # the file was replaced since (another state, another process)
        size = os.stat(jr.journal_path(path)).st_size
    except FileNotFoundError:
        size = 0
    if size != cursor.offset:
        return False  # someone else appended, or an append of ours was cut short: start over
    record = _change_record(state, cursor, slot_dtype)
    if record is None:
        return False
    meta, tensors = record
    estimate = sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(meta)) + 4096
    if cursor.offset + estimate > limit * cursor.base_bytes:
        return False  # compaction: the whole save that follows folds the journal into a new base
    generation = None
    if state.ltm is not None:
        generation = meta["ltm"] = _save_ltm(state, path)
    data = jr.encode(meta, tensors)
    journal_file = jr.journal_path(path)
    try:
        if cursor.offset == 0:  # the first record creates the journal, whole or not at all
            start = jr.start_record(cursor.journal_id)
            write_atomic(journal_file, start + data, mode=replacement_mode(path, 0o666))
            end = len(start) + len(data)
        else:
            end = jr.append(journal_file, cursor.offset, data)
    except BaseException:
        state._journal = None  # the journal's end is unknown now: the next save is a whole one
        if generation is not None:
            shutil.rmtree(ltm_path(path, generation), ignore_errors=True)
        raise
    kept = _Cursor.after(state, path, cursor.journal_id, end, cursor.seq + 1, slot_dtype)
    kept.base, kept.base_bytes = cursor.base, cursor.base_bytes
    state._journal = kept
    if generation is not None:
        _remove_stale_generations(path, keep=generation)
    return True


def _change_record(state: MemoryState, cursor: _Cursor, slot_dtype: str | None):
    """(meta, tensors) of what changed since `cursor`, or None if that is not a sequence of writes.

    After writes, each layer holds first the slots it kept from the saved pool (in their old
    order, `slot_origins`), then the slots added since; kept slots aged by the number of writes.
    Layers that drew their drops separately may keep different numbers of old slots: the record
    takes the same number from each (the fewest any layer kept) and stores the rest as new.
    """
    L, N, _ = state.shape
    origins = state.slot_origins(cursor.version)
    if origins is None:
        return None
    kept_count = int((origins >= 0).sum(dim=1).min())
    kept = origins[:, :kept_count]
    aged = state.write_count - cursor.write_count
    if aged < 0 or len(state.injections) < cursor.injections:
        return None
    if not (
        torch.equal(state.ages[:, :kept_count], cursor.ages.gather(1, kept) + aged)
        and torch.equal(state.sources[:, :kept_count], cursor.sources.gather(1, kept))
    ):
        return None  # changed otherwise than by writes: not expressible as a record
    dropped_mask = torch.ones(L, N, dtype=torch.bool)
    dropped_mask.scatter_(1, kept, False)
    dropped = dropped_mask.nonzero()[:, 1].view(L, N - kept_count).to(torch.int32)
    if L > 1 and (dropped == dropped[:1]).all():
        dropped = dropped[:1]  # one draw shared by all layers: one row
    new = state.stm[:, kept_count:]
    if slot_dtype == "int8":
        codes, scales = quantize_rows(new)
        tensors = {"stm_q": codes.cpu(), "stm_scale": scales.cpu()}
    else:
        tensors = {"stm": new.detach().cpu()}
    tensors.update(dropped=dropped, ages=state.ages[:, kept_count:], sources=state.sources[:, kept_count:])
    meta = {
        "seq": cursor.seq + 1,
        "journal": cursor.journal_id,
        "aged": aged,
        "write_count": state.write_count,
        "generator_state": _generator_state(state),
        "injections": [asdict(i) for i in list(state.injections.values())[cursor.injections :]],
    }
    return meta, tensors


def compact_state(path: str | Path, model: MemoryLLM | None = None) -> None:
    """Fold a journaled file's journal into a new base file (atomic), leaving no journal."""
    path = Path(path)
    state = load_state(path, model)
    manifest = read_manifest(path)
    _save_whole(state, path, manifest.get("slots"), journal=True)


def ltm_path(path: Path, generation: str) -> Path:
    """The folder of a state file's long-term store: always next to the file, named by generation id."""
    return path.parent / f"{path.name}.ltm-{generation}"


def _remove_stale_generations(path: Path, keep: str | None) -> None:
    for old in path.parent.glob(f"{path.name}.ltm-*"):
        generation = old.name.removeprefix(f"{path.name}.ltm-")
        if GENERATION.fullmatch(generation) and generation != keep:  # not another file's `<name>.ltm-...`
            shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | Path) -> dict:
    """The manifest of a memory file, without loading its tensors; for a journaled file, with the
    write counter, generator state, injection records and long-term generation of its journal's last
    record (whose metas are read and checked; slots are not read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            manifest = _check_manifest(path, f.metadata())
    except (FileNotFoundError, MemoryFileError):
        raise
    except Exception as err:  # safetensors reports truncation and bad headers with varied errors
        raise MemoryFileError(f"{path} is not a readable latentmem memory file ({err})") from err
    if "journal" in manifest:
        for meta, _ in _journal_records(Path(path), manifest, tensors=False)[1]:
            _fold_meta(manifest, meta)
        _check_records(path, manifest["injections"])
    return manifest


def _journal_records(path: Path, manifest: dict, *, tensors: bool):
    """(reader, records): the checked (meta, tensors or None) of each record of the file's journal,
    in order; once they are all read, `reader.end` says where the valid records end."""
    reader = jr.Reader(jr.journal_path(path), manifest["journal"])
    return reader, _checked_records(path, manifest, reader.records(tensors=tensors))


def _checked_records(path: Path, manifest: dict, records):
    seq = 0
    while True:
        try:
            item = next(records, None)
        except jr.JournalError as err:
            raise MemoryFileError(f"{path}: its journal is damaged ({err})") from err
        except OSError as err:
            raise MemoryFileError(f"{path}: its journal cannot be read ({err})") from err
        if item is None:
            return
        seq += 1
        meta = item[0]
        if meta.get("seq") != seq or meta.get("journal") != manifest["journal"]:
            raise MemoryFileError(f"{path}: journal record {seq} is out of sequence")
        for key, kind in (("aged", int), ("write_count", int), ("generator_state", str), ("injections", list)):
            if not _is(meta.get(key), kind):
                raise MemoryFileError(f"{path}: journal record {seq} has a malformed {key!r}")
        if not 0 <= meta["aged"] <= MAX_INT or not 0 <= meta["write_count"] <= MAX_INT:
            raise MemoryFileError(f"{path}: journal record {seq} has counters out of range")
        if "ltm" in meta and not _generation_id(path, meta["ltm"]):
            raise MemoryFileError(f"{path}: journal record {seq} names a malformed long-term generation")
        yield item


def _fold_meta(manifest: dict, meta: dict) -> None:
    """The manifest as a journal record leaves it (counters, generator, records, long-term generation)."""
    manifest["write_count"] = meta["write_count"]
    manifest["generator_state"] = meta["generator_state"]
    manifest["injections"] = manifest["injections"] + meta["injections"]
    if "ltm" in meta:
        manifest["ltm"] = meta["ltm"]


def names_long_term_store(path: str | Path) -> bool:
    """Whether a file's manifest has an `ltm` entry at all, valid or not (nothing else is checked)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            manifest = json.loads((f.metadata() or {})["manifest"])
    except Exception:  # not a readable file: it names nothing
        return False
    return isinstance(manifest, dict) and "ltm" in manifest


def _check_manifest(path: str | Path, metadata: dict | None) -> dict:
    try:
        manifest = json.loads((metadata or {})["manifest"])
    except (KeyError, TypeError, ValueError) as err:
        raise MemoryFileError(f"{path} is not a latentmem memory file (no readable manifest: {err!r})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MemoryFileError(f"{path} is not a latentmem memory file")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise MemoryFileError(f"{path} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise MemoryFileError(
            f"{path} has format version {version}, newer than the {FORMAT_VERSION} this latentmem reads; "
            "upgrade latentmem to read it"
        )
    if manifest.get("manifest_checksum") != _manifest_checksum(manifest):
        raise MemoryFileError(f"{path} is corrupted: manifest checksum mismatch or missing")
    for key, kind in REQUIRED.items():
        if not _is(manifest.get(key), kind):
            raise MemoryFileError(f"{path} has a malformed manifest: {key!r} is missing or not a {kind.__name__}")
    shape = manifest["shape"]
    if len(shape) != 3 or not all(_is(n, int) and 0 < n <= MAX_INT for n in shape):
        raise MemoryFileError(f"{path} has a malformed manifest: shape {shape}")
    if manifest["dtype"] not in DTYPES:
        raise MemoryFileError(f"{path} has a malformed manifest: dtype {manifest['dtype']!r} (one of {DTYPES})")
    for key in ("seed", "write_count"):
        if not 0 <= manifest[key] <= MAX_INT:
            raise MemoryFileError(f"{path} has a malformed manifest: {key} {manifest[key]} is not in 0..2^63-1")
    _check_records(path, manifest["injections"])
    generation = manifest.get("ltm")
    if generation is not None and not _generation_id(path, generation):
        raise MemoryFileError(f"{path} has a malformed manifest: 'ltm' must be a generation id (12 hex digits)")
    if "slots" in manifest and manifest["slots"] != "int8":
        raise MemoryFileError(f"{path} has a malformed manifest: slots {manifest.get('slots')!r} (int8 or absent)")
    journal = manifest.get("journal")
    if "journal" in manifest and not (isinstance(journal, str) and GENERATION.fullmatch(journal)):
        raise MemoryFileError(f"{path} has a malformed manifest: 'journal' must be a journal id (12 hex digits)")
    return manifest


def _is(value, kind) -> bool:
    """isinstance for JSON values, where a bool is not a number."""
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def _check_records(path: str | Path, records: list) -> None:
    seen = set()
    for record in records:
        if not isinstance(record, dict) or not (set(RECORD) - set(OPTIONAL_RECORD) <= set(record) <= set(RECORD)):
            raise MemoryFileError(f"{path} has a malformed injection record {str(record)[:200]}")
        for key, kind in RECORD.items():
            value = record.get(key, OPTIONAL_RECORD.get(key))
            if not _is(value, kind) or (kind is int and not 0 <= value <= MAX_INT):
                raise MemoryFileError(f"{path} has a malformed injection record: {key} {value!r}")
        if record.get("distinct_tokens") and not all(_is(t, int) and 0 <= t <= MAX_INT for t in record["distinct_tokens"]):
            raise MemoryFileError(f"{path} has a malformed injection record: distinct_tokens must be token ids")
        if not math.isfinite(record["timestamp"]) or not record.get("importance", 1.0) > 0:  # inf pins; NaN fails
            raise MemoryFileError(
                f"{path} has a malformed injection record: timestamp {record['timestamp']!r} must be finite, "
                f"importance {record.get('importance')!r} > 0"
            )
        if record["id"] in seen:
            raise MemoryFileError(f"{path} has two injection records with id {record['id']}")
        seen.add(record["id"])


def _generation_id(path: str | Path, value) -> str | None:
    """The generation id a manifest's `ltm` names, or None. Files saved before ids were bare hold
    `<file name>.ltm-<id>`, which names the same folder (and only while the file keeps its name)."""
    if not isinstance(value, str):
        return None
    value = value.removeprefix(f"{Path(path).name}.ltm-")
    return value if GENERATION.fullmatch(value) else None


def load_state(path: str | Path, model: "MemoryLLM | None" = None) -> MemoryState:
    path = Path(path)
    try:
        # One open: the manifest and the tensors come from the same file even if a save replaces it
        # meanwhile. get_tensor maps the file, so copy: the state must not change (or fault) when
        # the file is later rewritten in place or truncated.
        with safe_open(str(path), framework="pt") as f:
            manifest = _check_manifest(path, f.metadata())
            if model is not None:
                _check_fits(path, manifest, model)
            names = INT8_TENSORS if manifest.get("slots") == "int8" else TENSORS
            before = _identity(os.stat(path))
            tensors = {name: f.get_tensor(name).clone() for name in names}
    except (FileNotFoundError, MemoryFileError):
        raise
    except Exception as err:  # safetensors reports truncation and bad headers with varied errors
        raise MemoryFileError(f"{path} is not a readable latentmem memory file ({err})") from err
    if _checksum(tensors) != manifest["checksum"]:
        raise MemoryFileError(f"{path} is corrupted: checksum mismatch")
    if "tiled" in manifest:
        _untile(path, manifest, tensors)
    _check_tensors(path, manifest, tensors, slots_only=True)
    end, seq = 0, 0
    if "journal" in manifest:
        end, seq = _replay_journal(path, manifest, tensors)
        _check_records(path, manifest["injections"])
    if "stm_q" in tensors:
        tensors["stm"] = dequantize_pool(tensors.pop("stm_q"), tensors.pop("stm_scale"), _DTYPE[manifest["dtype"]])
    _check_tensors(path, manifest, tensors)

    L, N, d = manifest["shape"]
    state = MemoryState(
        L, N, d,
        dtype=tensors["stm"].dtype,
        device=model.device if model is not None else "cpu",
        seed=manifest["seed"],
        fingerprint=manifest["fingerprint"],
    )  # fmt: skip
    if manifest["initialized"]:
        state.replace_pool(tensors["stm"].to(state.device), tensors["ages"], tensors["sources"])
    if "ltm" in manifest:
        state.ltm = _open_ltm(path, _generation_id(path, manifest["ltm"]), L, d)
    state.write_count = manifest["write_count"]
    state.injections = {i["id"]: Injection(**i) for i in manifest["injections"]}
    try:
        generator_state = base64.b64decode(manifest["generator_state"], validate=True)
        state.generator.set_state(torch.frombuffer(bytearray(generator_state), dtype=torch.uint8))
    except Exception as err:  # not base64, or not a generator state
        raise MemoryFileError(f"{path} has a malformed manifest: generator state ({err!r})") from err
    if manifest["initialized"] and "tiled" in manifest and seq == 0:
        state.tile_period = manifest["tiled"]  # still one write tiled: a whole save stays one copy
    if "journal" in manifest:  # later journaled saves of this state append to its journal (or start it)
        cursor = _Cursor.after(state, path, manifest["journal"], end or 0, seq, manifest.get("slots"))
        if cursor.base == before:  # else the file was replaced while read: the next save is a whole one
            state._journal = cursor
    return state


_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _untile(path: Path, manifest: dict, tensors: dict) -> None:
    """Expand a tiled file's stored copy to the whole pool (in place of `tensors`' entries)."""
    L, N, _ = manifest["shape"]
    period = manifest["tiled"]
    if not (_is(period, int) and 0 < period < N):
        raise MemoryFileError(f"{path} has a malformed manifest: tiled {period!r} (1..{N - 1} slots)")
    for name, stored in tensors.items():
        if stored.dim() < 2 or tuple(stored.shape[:2]) != (L, period):
            raise MemoryFileError(f"{path}: {name} is {list(stored.shape)}, the manifest says {period} tiled slots")
        tensors[name] = tile_to_fill(stored, N)


def _replay_journal(path: Path, manifest: dict, tensors: dict) -> tuple[int | None, int]:
    """Apply the journal's records to the base tensors, in place; returns (end of the valid records, count).

    Two passes, so a long journal costs one move of the pool, not one per record: the first applies
    every record to the small per-slot tensors and to a map of where each final slot comes from (a
    base slot, or row j of record r); the second reads the records again and copies the rows of the
    big slot tensor that survived into place (base slots first: they only ever move down).
    """
    L, N, _ = manifest["shape"]
    big = "stm_q" if "stm_q" in tensors else "stm"
    small = [name for name in tensors if name != big]
    from_record = torch.full((L, N), -1, dtype=torch.long)  # 0: the base, r >= 1: record r
    from_row = torch.arange(N).repeat(L, 1)
    reader, records = _journal_records(path, manifest, tensors=True)
    seq = 0
    for meta, changes in records:
        seq += 1
        kept, D = _record_layout(path, manifest, tensors, meta, changes, seq)
        for name in small:
            tensors[name] = torch.cat([tensors[name].gather(1, kept), changes[name]], dim=1)
        tensors["ages"][:, : N - D] += meta["aged"]
        from_record = torch.cat([from_record.gather(1, kept), torch.full((L, D), seq)], dim=1)
        from_row = torch.cat([from_row.gather(1, kept), torch.arange(D).repeat(L, 1)], dim=1)
        _fold_meta(manifest, meta)
    end = reader.end
    if seq == 0:
        return end, 0
    pool = tensors[big]
    for layer in range(L):
        from_base = int((from_record[layer] == -1).sum())  # the first ones: base slots come first
        pool[layer, :from_base] = pool[layer].index_select(0, from_row[layer, :from_base])
    copied = 0
    for _, changes in _journal_records(path, manifest, tensors=True)[1]:
        copied += 1
        if copied > seq:
            break  # appended since the first pass: not part of this state
        rows = changes[big]
        for layer in range(L):
            where = (from_record[layer] == copied).nonzero().view(-1)
            if where.numel():
                pool[layer, where] = rows[layer].index_select(0, from_row[layer, where])
    if copied < seq:
        raise MemoryFileError(f"{path}: its journal changed while it was read")
    return end, seq


def _record_layout(path: Path, manifest: dict, tensors: dict, meta: dict, changes: dict, seq: int):
    """Check a record against the pool; returns (kept [L, N - D] slot indices per layer, D new slots)."""
    L, N, _ = manifest["shape"]
    if set(changes) != {"dropped", *tensors}:
        raise MemoryFileError(f"{path}: journal record {seq} holds {sorted(changes)}, not {sorted(tensors)} + dropped")
    if not manifest["initialized"]:
        raise MemoryFileError(f"{path}: journal record {seq} changes an empty pool")
    dropped = changes["dropped"]
    if dropped.dtype != torch.int32 or dropped.dim() != 2 or dropped.shape[0] not in (1, L) or dropped.shape[1] > N:
        raise MemoryFileError(f"{path}: journal record {seq} has malformed dropped slots {list(dropped.shape)}")
    D = dropped.shape[1]
    dropped = dropped.long()
    if D and ((dropped < 0).any() or (dropped >= N).any() or (dropped[:, 1:] <= dropped[:, :-1]).any()):
        raise MemoryFileError(f"{path}: journal record {seq} drops slots out of range or out of order")
    for name, base in tensors.items():
        new = changes[name]
        if new.dtype != base.dtype or tuple(new.shape) != (L, D, *base.shape[2:]):
            raise MemoryFileError(f"{path}: journal record {seq}: {name} is {list(new.shape)} {new.dtype}")
    keep = torch.ones(dropped.shape[0], N, dtype=torch.bool)
    keep.scatter_(1, dropped, False)
    kept = keep.nonzero()[:, 1].view(dropped.shape[0], N - D).expand(L, -1)  # ascending per layer
    return kept, D


def _check_fits(path: Path, manifest: dict, model: "MemoryLLM") -> None:
    """Refuse a state that `model` cannot use: another fingerprint, shape, dtype or kind of memory."""
    if manifest["fingerprint"] != model.fingerprint:
        raise MemoryFileError(
            f"{path} holds memory for another model (fingerprint {manifest['fingerprint']}, "
            f"this model {model.fingerprint}, shape {manifest['shape']})"
        )
    b = model.backbone.config
    shape, dtype = [b.num_hidden_layers, model.config.memory_size, b.hidden_size], str(model.dtype)
    if manifest["shape"] != shape or manifest["dtype"] != dtype.removeprefix("torch."):
        raise MemoryFileError(
            f"{path} holds a {manifest['shape']} {manifest['dtype']} memory; this model's is {shape} {dtype}"
        )
    if ("ltm" in manifest) == model.reads_short_term_only:
        kind = "short-term only" if model.reads_short_term_only else "with long-term memory (M+)"
        raise MemoryFileError(f"{path} does not hold the kind of memory this model reads ({kind})")


def _check_tensors(path: Path, manifest: dict, tensors: dict[str, torch.Tensor], slots_only: bool = False) -> None:
    """Shapes and dtypes of the tensors as read (`slots_only`: before a journal is applied), then,
    once complete, their values: a finite pool, ages >= 0, provenance naming recorded injections."""
    L, N, d = manifest["shape"]
    expected = {"ages": ((L, N), "int64"), "sources": ((L, N), "int64")}
    if "stm_q" in tensors:
        expected.update(stm_q=((L, N, d), "int8"), stm_scale=((L, N), "float32"))
    else:
        expected["stm"] = ((L, N, d), manifest["dtype"])
    for name, (shape, dtype) in expected.items():
        got = (tuple(tensors[name].shape), str(tensors[name].dtype).removeprefix("torch."))
        if got != (shape, dtype):
            raise MemoryFileError(f"{path}: {name} is {list(got[0])} {got[1]}, the manifest says {list(shape)} {dtype}")
    if slots_only:
        return
    if not torch.isfinite(tensors["stm"]).all():
        raise MemoryFileError(f"{path}: the memory pool holds NaN or infinite values")
    if (tensors["ages"] < 0).any():
        raise MemoryFileError(f"{path}: slot ages must be >= 0")
    recorded = torch.tensor([EXTERNAL] + [i["id"] for i in manifest["injections"]], dtype=torch.int64)
    if not torch.isin(tensors["sources"], recorded).all():
        raise MemoryFileError(f"{path}: slots name injections that have no record")


def _open_ltm(path: Path, generation: str, num_layers: int, hidden_size: int):
    from .ltm.store import LongTermStore

    try:
        store = LongTermStore.open(ltm_path(path, generation), mmap=True)
    except FileNotFoundError as err:
        raise MemoryFileError(f"{path} names long-term memory generation {generation}, which is missing") from err
    except Exception as err:  # LTMFileError, or a manifest entry of the wrong type
        raise MemoryFileError(f"{path}: its long-term memory {generation} cannot be read ({err})") from err
    if (store.num_layers, store.hidden_size) != (num_layers, hidden_size):
        raise MemoryFileError(f"{path}: its long-term memory has {store.num_layers} layers of {store.hidden_size}")
    return store
