"""The memory states of every user and session in a shared object store (store.py), for replicas.

`StoreRegistry` is the `StateRegistry` of one replica among several: the store holds the truth,
under `states/<user>/<session>.safetensors` (the same file format as on disk), and the replica
keeps a cache folder (`<data_dir>/store-cache`, emptied at start) with the states it has loaded.
What changes:

- **Loading** fetches the object with its version; every later read or write of a loaded state
  first asks the store for the object's current version (one HEAD) and reloads if another
  replica committed since, so a request sees the last acknowledged write wherever it went.
- **Saving** commits to the store over the version the state was read at (conditional write).
  If another replica committed first, the commit is refused (`StaleState`, HTTP 409), nothing
  is written, and the state is dropped here so the next request reads the newer one. A write is
  acknowledged only after its commit returned, so a replica killed at any point loses only writes
  that were never acknowledged.
- **Sessions** are listed from the store; writes, injections and creation time travel as object
  metadata. A state that fails its checks raises `DamagedState` on every use, as on disk, until
  a reset or import replaces it (the damaged object itself stays in the store, never read as empty).

A state of a model that reads long-term memory (M+) is a file plus a folder of arrays named by
the file (`<file>.ltm-<generation>`): its object is an uncompressed tar of the two, committed as
one object (so the commit stays one conditional write), and unpacked into the cache on load.
Only that file and that folder are ever unpacked. Every commit rewrites the whole object.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from ..ltm.files import write_atomic
from ..persistence import GENERATION, MemoryFileError, ltm_path, read_manifest
from ..state import MemoryState
from ..store import ObjectStore, StaleVersion, open_store
from .auth import NAME_PATTERN
from .states import DEFAULT_SESSION, SUFFIX, DamagedState, Slot, StateRegistry, UnknownSession, _reason

logger = logging.getLogger("latentmem.server")


class StaleState(RuntimeError):
    """A commit refused: another replica committed this memory after this one read it."""

    def __init__(self, session: str):
        super().__init__(session)
        self.session = session


class StoreRegistry(StateRegistry):
    def __init__(
        self,
        model,
        store: ObjectStore | str,
        cache_dir: str | Path,
        *,
        max_loaded: int = 64,
        storage_options: dict | None = None,
    ):
        self.store = store if isinstance(store, ObjectStore) else open_store(store, storage_options)
        # Its own folder under cache_dir (never a local server's states/ next to it), emptied: a
        # former run's cache is stale by definition, the store is the truth.
        cache = Path(cache_dir) / "store-cache"
        shutil.rmtree(cache, ignore_errors=True)
        self._versions: dict[tuple[str, str], str | None] = {}  # version each loaded state was read at
        self._created: dict[tuple[str, str], str] = {}
        self._damaged: dict[tuple[str, str], str] = {}  # why, for states this replica found damaged
        super().__init__(model, cache, max_loaded=max_loaded)

    @staticmethod
    def key(user: str, session: str) -> str:
        return f"states/{user}/{session}{SUFFIX}"

    # --- the store answers what the index answered ---------------------------------------
    def rebuild_index(self) -> None:
        """Nothing to rebuild: the store is listed when asked (the local index stays empty)."""

    def exists(self, user: str, session: str) -> bool:
        return session == DEFAULT_SESSION or self.store.head(self.key(user, session)) is not None

    def _session_keys(self, user: str) -> list[str]:
        names = (key.rsplit("/", 1)[-1] for key in self.store.list(f"states/{user}"))
        return [name.removesuffix(SUFFIX) for name in names if name.endswith(SUFFIX)
                and NAME_PATTERN.fullmatch(name.removesuffix(SUFFIX))]  # fmt: skip

    def sessions(self, user: str) -> list[dict]:
        found = []
        for session in self._session_keys(user):
            head = self.store.head(self.key(user, session))
            if head is None:  # reset or gone between the listing and now
                continue
            found.append({
                "session": session, "created": _number(head.meta.get("created"), head.modified),
                "updated": head.modified, "writes": int(_number(head.meta.get("writes"), 0)),
                "injections": int(_number(head.meta.get("injections"), 0)), "bytes": head.size,
                "damaged": self._damaged.get((user, session)),
            })  # fmt: skip
        return sorted(found, key=lambda row: (row["created"], row["session"]))

    def count_sessions(self, user: str) -> int:
        return len(self._session_keys(user))

    # --- loading and committing ------------------------------------------------------------
    def _load(self, slot: Slot, user: str, session: str, *, create: bool) -> MemoryState:
        key = (user, session)
        if slot.state is not None:
            head = self.store.head(self.key(user, session))
            if (head.version if head else None) == self._versions.get(key):
                return slot.state
            slot.state = None  # committed elsewhere since: read it again
        blob = self.store.get(self.key(user, session))
        if blob is None:
            self._damaged.pop(key, None)
            if not (create or session == DEFAULT_SESSION):
                raise UnknownSession(session)
            slot.state, self._versions[key] = self.new_state(), None
            self._created[key] = repr(time.time())
            return slot.state
        data, head = blob
        path = self.path(user, session)
        try:
            _unpack(path, data)
            state = MemoryState.load(path, self.model)
        except MemoryFileError as err:
            path.unlink(missing_ok=True)
            reason = _reason(err, path, session)
            self._damaged[key] = reason
            logger.error("memory %s/%s in the store failed its checks: %s", user, session, reason)
            raise DamagedState(session, reason) from err
        self._damaged.pop(key, None)
        self._versions[key], self._created[key] = head.version, head.meta.get("created") or repr(head.modified)
        slot.state = state
        return state

    def _save(self, user: str, session: str, state: MemoryState) -> None:
        key, path = (user, session), self.path(user, session)
        state.save(path)  # the cache copy, atomic; the commit below is what counts
        meta = {
            "writes": str(state.write_count), "injections": str(len(state.injections)),
            "created": self._created.get(key) or repr(time.time()),
        }  # fmt: skip
        try:
            head = self.store.put(self.key(user, session), _pack(path), expected=self._versions.get(key), meta=meta)
        except StaleVersion as err:
            self._versions.pop(key, None)
            path.unlink(missing_ok=True)
            logger.warning("commit of %s/%s refused: committed elsewhere since it was read here", user, session)
            raise StaleState(session) from err
        except BaseException:
            self._versions.pop(key, None)  # unknown whether it landed: read the store again next time
            path.unlink(missing_ok=True)
            raise
        self._versions[key] = head.version
        self._damaged.pop(key, None)

    def replace(self, user: str, session: str, state: MemoryState) -> None:
        """Install `state` over whatever the store holds now (never read: a damaged one is replaced too)."""
        key = (user, session)
        with self._held(user, session) as slot:
            slot.state = None
            head = self.store.head(self.key(user, session))
            self._versions[key] = head.version if head else None
            self._created[key] = (head.meta.get("created") if head else None) or repr(time.time())
            self._save(user, session, state)
            slot.state = state

    def unload(self, user: str, session: str) -> None:
        """Drop a state from this replica (if no request holds it); the store keeps it."""
        with self._lock:
            slot = self._slots.get((user, session))
            if slot is not None and slot.users == 0:
                del self._slots[(user, session)]
                self._forget(user, session)

    def _evict(self) -> None:
        before = set(self._slots)
        super()._evict()
        for user, session in before - set(self._slots):
            self._forget(user, session)

    def _forget(self, user: str, session: str) -> None:
        self._versions.pop((user, session), None)
        path = self.path(user, session)
        path.unlink(missing_ok=True)
        for folder in path.parent.glob(f"{path.name}.ltm-*"):
            shutil.rmtree(folder, ignore_errors=True)


def _number(text: str | None, default: float) -> float:
    try:
        return float(text) if text is not None else default
    except ValueError:
        return default


def _pack(path: Path) -> bytes:
    """A saved state as one object: the file itself, or a tar of it and its long-term store folder."""
    generation = read_manifest(path).get("ltm")
    if generation is None:
        return path.read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(path, arcname=path.name)
        tar.add(ltm_path(path, generation), arcname=ltm_path(path, generation).name)
    return buffer.getvalue()


def _unpack(path: Path, data: bytes) -> None:
    """An object into the cache as `path` (and its long-term store folder): only those, nothing else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if data[257:262] != b"ustar":  # a plain state file
        _write_file(path, data)
        return
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            state = [m for m in members if m.name == path.name and m.isfile()]
            folders = {m.name.split("/")[0] for m in members} - {path.name}
            if len(state) != 1 or len(folders) != 1:
                raise MemoryFileError("the stored object is not a state file and its long-term store")
            folder = folders.pop()
            if not (folder.startswith(f"{path.name}.ltm-") and GENERATION.fullmatch(folder.rsplit("-", 1)[-1])):
                raise MemoryFileError(f"the stored object holds {folder!r}, not a long-term store of its state")
            if not all(m.isfile() or m.isdir() for m in members):
                raise MemoryFileError("the stored object holds links or devices")
            if not (path.parent / folder).exists():  # one generation id is one content: unpack it once
                staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=path.parent))
                try:
                    tar.extractall(staging, members=[m for m in members if m.name != path.name], filter="data")
                    os.replace(staging / folder, path.parent / folder)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            _write_file(path, tar.extractfile(state[0]).read())
    except (tarfile.TarError, OSError) as err:
        raise MemoryFileError(f"the stored object cannot be unpacked ({err})") from err


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, durable=False)  # a cache of the store: losing it costs a download
