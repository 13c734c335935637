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
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from .ltm.files import replacement_mode, write_atomic
from .state import EXTERNAL, Injection, MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM

FORMAT = "latentmem.memory_state"
FORMAT_VERSION = 1
TENSORS = ("stm", "ages", "sources")
# Manifest fields a version-1 file must have, with their JSON types.
REQUIRED = {
    "fingerprint": str, "shape": list, "dtype": str, "seed": int, "generator_state": str,
    "initialized": bool, "write_count": int, "injections": list, "checksum": str, "manifest_checksum": str,
}  # fmt: skip
# An injection record's fields (importance is optional: files from before it existed lack it).
RECORD = {"id": int, "source": str, "tokens": int, "timestamp": (int, float), "importance": (int, float)}
DTYPES = ("float16", "bfloat16", "float32", "float64")
GENERATION = re.compile(r"[0-9a-f]{12}")  # a long-term store's generation id
MAX_INT = 2**63 - 1  # counters and ids are int64 in tensors and in the server's index


class MemoryFileError(ValueError):
    """A memory file that cannot be loaded: truncated, corrupted, foreign or for another model."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in TENSORS:
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest (all fields but this one): the generator state, write counter and
    injection records are not covered by the tensor checksum, and a flipped digit there still parses."""
    body = {key: value for key, value in manifest.items() if key != "manifest_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_state(state: MemoryState, path: str | Path) -> None:
    path = Path(path)
    tensors = {
        "stm": state.stm.detach().contiguous().cpu(),
        "ages": state.ages.contiguous(),
        "sources": state.sources.contiguous(),
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": state.fingerprint,
        "shape": list(state.shape),
        "dtype": str(state.dtype).removeprefix("torch."),
        "seed": state.seed,
        "generator_state": base64.b64encode(state.generator.get_state().numpy().tobytes()).decode(),
        "initialized": state.initialized,
        "write_count": state.write_count,
        "injections": [asdict(i) for i in state.injections.values()],
        "checksum": _checksum(tensors),
    }
    if state.ltm is not None:
        # Long-term memory is a folder of (memory-mapped) arrays. Each save writes a new generation
        # next to the file and the file names it, so the rename of the file is the one commit point:
        # a crash before it leaves the old file naming the old, complete generation.
        generation = uuid.uuid4().hex[:12]
        state.ltm.save(ltm_path(path, generation))
        manifest["ltm"] = generation
    manifest["manifest_checksum"] = _manifest_checksum(manifest)
    payload = save_bytes(tensors, metadata={"manifest": json.dumps(manifest)})
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # the mode of the file it replaces, or the umask's (mkstemp would make it 0600)
        write_atomic(path, payload, mode=replacement_mode(path, 0o666))  # fsynced, and the rename too
    except BaseException:
        if "ltm" in manifest:
            shutil.rmtree(ltm_path(path, manifest["ltm"]), ignore_errors=True)
        raise
    _remove_stale_generations(path, keep=manifest.get("ltm"))


def ltm_path(path: Path, generation: str) -> Path:
    """The folder of a state file's long-term store: always next to the file, named by generation id."""
    return path.parent / f"{path.name}.ltm-{generation}"


def _remove_stale_generations(path: Path, keep: str | None) -> None:
    for old in path.parent.glob(f"{path.name}.ltm-*"):
        generation = old.name.removeprefix(f"{path.name}.ltm-")
        if GENERATION.fullmatch(generation) and generation != keep:  # not another file's `<name>.ltm-...`
            shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | Path) -> dict:
    """The manifest of a memory file, without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return _check_manifest(path, f.metadata())
    except (FileNotFoundError, MemoryFileError):
        raise
    except Exception as err:  # safetensors reports truncation and bad headers with varied errors
        raise MemoryFileError(f"{path} is not a readable latentmem memory file ({err})") from err


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
    return manifest


def _is(value, kind) -> bool:
    """isinstance for JSON values, where a bool is not a number."""
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def _check_records(path: str | Path, records: list) -> None:
    seen = set()
    for record in records:
        if not isinstance(record, dict) or not (set(RECORD) - {"importance"} <= set(record) <= set(RECORD)):
            raise MemoryFileError(f"{path} has a malformed injection record {str(record)[:200]}")
        for key, kind in RECORD.items():
            value = record.get(key, 1.0)
            if not _is(value, kind) or (kind is int and not 0 <= value <= MAX_INT):
                raise MemoryFileError(f"{path} has a malformed injection record: {key} {value!r}")
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
            tensors = {name: f.get_tensor(name).clone() for name in TENSORS}
    except (FileNotFoundError, MemoryFileError):
        raise
    except Exception as err:  # safetensors reports truncation and bad headers with varied errors
        raise MemoryFileError(f"{path} is not a readable latentmem memory file ({err})") from err
    if _checksum(tensors) != manifest["checksum"]:
        raise MemoryFileError(f"{path} is corrupted: checksum mismatch")
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
    return state


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


def _check_tensors(path: Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    L, N, d = manifest["shape"]
    expected = {"stm": ((L, N, d), manifest["dtype"]), "ages": ((L, N), "int64"), "sources": ((L, N), "int64")}
    for name, (shape, dtype) in expected.items():
        got = (tuple(tensors[name].shape), str(tensors[name].dtype).removeprefix("torch."))
        if got != (shape, dtype):
            raise MemoryFileError(f"{path}: {name} is {list(got[0])} {got[1]}, the manifest says {list(shape)} {dtype}")
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
