"""Saving and loading a MemoryState: one `.safetensors` file, written atomically.

The file holds the tensors (`stm`, `ages`, `sources`) and, in its header metadata, a JSON manifest:
format version, model fingerprint, shapes, dtype, the generator state, the write counter, the
injection records and a SHA-256 checksum of the tensor bytes. A save goes to a temporary file in
the same folder that is flushed to disk and then renamed over the target, so a crash mid-save
leaves the previous file intact. Loading checks everything before returning: a truncated,
corrupted or foreign file raises `MemoryFileError` and never yields partial memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from .state import Injection, MemoryState

if TYPE_CHECKING:
    from .modeling import MemoryLLM

FORMAT = "latentmem.memory_state"
FORMAT_VERSION = 1
TENSORS = ("stm", "ages", "sources")


class MemoryFileError(ValueError):
    """A memory file that cannot be loaded: truncated, corrupted, foreign or for another model."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in TENSORS:
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    payload = save_bytes(tensors, metadata={"manifest": json.dumps(manifest)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable (a crash right after save must not bring back the old file).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: str | Path) -> dict:
    """The manifest of a memory file, without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        manifest = json.loads(metadata["manifest"])
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors reports truncation and bad headers with varied errors
        raise MemoryFileError(f"{path} is not a readable latentmem memory file ({err})") from err
    if manifest.get("format") != FORMAT:
        raise MemoryFileError(f"{path} is not a latentmem memory file")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise MemoryFileError(f"{path} has format version {manifest['format_version']}; upgrade latentmem to read it")
    return manifest


def load_state(path: str | Path, model: "MemoryLLM | None" = None) -> MemoryState:
    path = Path(path)
    manifest = read_manifest(path)
    if model is not None and manifest["fingerprint"] != model.fingerprint:
        raise MemoryFileError(
            f"{path} holds memory for another model (fingerprint {manifest['fingerprint']}, "
            f"this model {model.fingerprint}, shape {manifest['shape']})"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in TENSORS}
    except Exception as err:
        raise MemoryFileError(f"{path} is truncated or corrupted ({err})") from err
    if _checksum(tensors) != manifest["checksum"]:
        raise MemoryFileError(f"{path} is corrupted: checksum mismatch")
    L, N, d = manifest["shape"]
    if tuple(tensors["stm"].shape) != (L, N, d):
        raise MemoryFileError(f"{path}: stm has shape {list(tensors['stm'].shape)}, manifest says {[L, N, d]}")

    state = MemoryState(
        L, N, d,
        dtype=tensors["stm"].dtype,
        device=model.device if model is not None else "cpu",
        seed=manifest["seed"],
        fingerprint=manifest["fingerprint"],
    )  # fmt: skip
    if manifest["initialized"]:
        state.replace_pool(tensors["stm"].to(state.device), tensors["ages"], tensors["sources"])
    state.write_count = manifest["write_count"]
    state.injections = {i["id"]: Injection(**i) for i in manifest["injections"]}
    generator_state = torch.frombuffer(bytearray(base64.b64decode(manifest["generator_state"])), dtype=torch.uint8)
    state.generator.set_state(generator_state)
    return state
