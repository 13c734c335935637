"""Saving and loading a MemoryState: one `.safetensors` file, written atomically.

The file holds the tensors (`stm`, `ages`, `sources`) and, in its header metadata, a JSON manifest:
format version, model fingerprint, shapes, dtype, the generator state, the write counter, the
injection records, a SHA-256 checksum of the tensor bytes and one of the manifest itself. A save
goes to a temporary file in the same folder that is flushed to disk and then renamed over the
target, so a crash mid-save leaves the previous file intact; the file gets the permissions of the
file it replaces (or the umask's, for a new one). Loading checks everything before returning: a
truncated, corrupted or foreign file raises `MemoryFileError` and never yields partial memory, and
the loaded tensors are copies (they never alias the file, which may change after loading).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from .ltm.files import fsync_dir, replacement_mode
from .state import Injection, MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM

FORMAT = "latentmem.memory_state"
FORMAT_VERSION = 1
TENSORS = ("stm", "ages", "sources")
# Manifest fields a version-1 file must have, with their JSON types.
REQUIRED = {
    "fingerprint": str, "shape": list, "dtype": str, "seed": int, "generator_state": str,
    "initialized": bool, "write_count": int, "injections": list, "checksum": str,
}  # fmt: skip


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
        generation = f"{path.name}.ltm-{uuid.uuid4().hex[:12]}"
        state.ltm.save(path.parent / generation)
        manifest["ltm"] = generation
    manifest["manifest_checksum"] = _manifest_checksum(manifest)
    payload = save_bytes(tensors, metadata={"manifest": json.dumps(manifest)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600: give it the mode of the file it replaces, or the umask's.
        os.chmod(tmp, replacement_mode(path, 0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if "ltm" in manifest:
            shutil.rmtree(path.parent / manifest["ltm"], ignore_errors=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable
    _remove_stale_generations(path, keep=manifest.get("ltm"))


def _remove_stale_generations(path: Path, keep: str | None) -> None:
    for old in path.parent.glob(f"{path.name}.ltm-*"):
        if old.name != keep:
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
    if "manifest_checksum" in manifest and manifest["manifest_checksum"] != _manifest_checksum(manifest):
        raise MemoryFileError(f"{path} is corrupted: manifest checksum mismatch")
    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise MemoryFileError(f"{path} has a malformed manifest: {key!r} is missing or not a {kind.__name__}")
    shape = manifest["shape"]
    if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise MemoryFileError(f"{path} has a malformed manifest: shape {shape}")
    return manifest


def load_state(path: str | Path, model: "MemoryLLM | None" = None) -> MemoryState:
    path = Path(path)
    try:
        # One open: the manifest and the tensors come from the same file even if a save replaces it
        # meanwhile. get_tensor maps the file, so copy: the state must not change (or fault) when
        # the file is later rewritten in place or truncated.
        with safe_open(str(path), framework="pt") as f:
            manifest = _check_manifest(path, f.metadata())
            if model is not None and manifest["fingerprint"] != model.fingerprint:
                raise MemoryFileError(
                    f"{path} holds memory for another model (fingerprint {manifest['fingerprint']}, "
                    f"this model {model.fingerprint}, shape {manifest['shape']})"
                )
            tensors = {name: f.get_tensor(name).clone() for name in TENSORS}
    except (FileNotFoundError, MemoryFileError):
        raise
    except Exception as err:  # safetensors reports truncation and bad headers with varied errors
        raise MemoryFileError(f"{path} is not a readable latentmem memory file ({err})") from err
    if _checksum(tensors) != manifest["checksum"]:
        raise MemoryFileError(f"{path} is corrupted: checksum mismatch")
    L, N, d = manifest["shape"]
    expected = {"stm": ((L, N, d), manifest["dtype"]), "ages": ((L, N), "int64"), "sources": ((L, N), "int64")}
    for name, (shape, dtype) in expected.items():
        got = (tuple(tensors[name].shape), str(tensors[name].dtype).removeprefix("torch."))
        if got != (shape, dtype):
            raise MemoryFileError(f"{path}: {name} is {list(got[0])} {got[1]}, the manifest says {list(shape)} {dtype}")

    state = MemoryState(
        L, N, d,
        dtype=tensors["stm"].dtype,
        device=model.device if model is not None else "cpu",
        seed=manifest["seed"],
        fingerprint=manifest["fingerprint"],
    )  # fmt: skip
    if manifest["initialized"]:
        state.replace_pool(tensors["stm"].to(state.device), tensors["ages"], tensors["sources"])
    if manifest.get("ltm"):
        from .ltm.store import LongTermStore

        try:
            state.ltm = LongTermStore.open(path.parent / manifest["ltm"], mmap=True)
        except FileNotFoundError as err:
            raise MemoryFileError(f"{path} names long-term memory {manifest['ltm']}, which is missing") from err
    state.write_count = manifest["write_count"]
    try:
        state.injections = {i["id"]: Injection(**i) for i in manifest["injections"]}
        generator_state = base64.b64decode(manifest["generator_state"], validate=True)
        state.generator.set_state(torch.frombuffer(bytearray(generator_state), dtype=torch.uint8))
    except Exception as err:  # a malformed record or generator state
        raise MemoryFileError(f"{path} has a malformed manifest ({err!r})") from err
    return state
