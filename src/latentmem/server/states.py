"""The memory states of every user and session: on disk, loaded on demand, one lock each.

Layout under the data directory:

    states/<user>/<session>.safetensors    one MemoryState per (user, session), `MemoryState.save`
    index.sqlite3                          (user, session) -> file, write count, injections, times

The files are the truth; the index is derived from them (rebuilt from the files' manifests at
start-up, so a crash between saving a file and updating the index heals itself) and answers
"does this session exist" and "which sessions does this user have" without touching the files.

`read(user, session)` and `write(user, session)` hold the state's lock for the whole block, so
requests on one state are serialised while other states proceed in parallel. A write is saved
(atomically) before its block ends; if the block raises, the in-memory state is dropped and
reloaded from its file on next use, so a failed request never leaves a partial write behind.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..modeling import MemoryLLM
from ..persistence import MemoryFileError, read_manifest
from ..state import MemoryState
from .auth import NAME_PATTERN

logger = logging.getLogger("latentmem.server")

DEFAULT_SESSION = "default"  # every user has it; other sessions exist once written
SUFFIX = ".safetensors"
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    user TEXT NOT NULL, session TEXT NOT NULL, file TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, writes INTEGER NOT NULL,
    injections INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (user, session)
)"""


class UnknownSession(LookupError):
    """The user has no session of that name (never written, or a name of another user's)."""


class ShuttingDown(RuntimeError):
    """The registry was closed: no new reads or writes."""


@dataclass
class Slot:
    """A loaded (or loadable) state and its lock. `state` may be replaced inside a write."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    state: MemoryState | None = None
    users: int = 0  # threads holding or waiting for `lock`: a slot in use is never evicted


class StateRegistry:
    def __init__(self, model: MemoryLLM, data_dir: str | Path, *, max_loaded: int = 64):
        self.model = model
        self.root = Path(data_dir)
        (self.root / "states").mkdir(parents=True, exist_ok=True)
        self.max_loaded = max_loaded
        self._lock = threading.Condition()  # guards _slots, _db and _closed; notified when a slot is let go
        self._slots: OrderedDict[tuple[str, str], Slot] = OrderedDict()
        self._closed = False
        self._db = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # the index is rebuilt from the files after a crash
        self._db.execute(SCHEMA)
        self.rebuild_index()

    def path(self, user: str, session: str) -> Path:
        return self.root / "states" / user / f"{session}{SUFFIX}"

    # --- the index ------------------------------------------------------------------------
    def rebuild_index(self) -> None:
        """Make the index match the files: drop rows without a file, (re)read every file's manifest."""
        found: set[tuple[str, str]] = set()
        for folder in (self.root / "states").iterdir():
            if not folder.is_dir():
                continue
            for leftover in folder.glob(f".*{SUFFIX}.*.tmp"):  # a save interrupted by a crash
                leftover.unlink(missing_ok=True)
            for file in folder.glob(f"*{SUFFIX}"):
                user, session = folder.name, file.name.removesuffix(SUFFIX)
                if not (NAME_PATTERN.match(user) and NAME_PATTERN.match(session)):
                    continue
                try:
                    self._index(user, session, read_manifest(file), file)
                except MemoryFileError as err:  # never written by us (saves are atomic): keep it aside
                    aside = file.with_name(f"{file.name}.unreadable-{int(time.time())}")
                    file.rename(aside)
                    logger.error("set aside unreadable memory file %s as %s: %s", file, aside.name, err)
                    continue
                found.add((user, session))
        with self._lock:
            for user, session in self._db.execute("SELECT user, session FROM sessions").fetchall():
                if (user, session) not in found:
                    self._db.execute("DELETE FROM sessions WHERE user = ? AND session = ?", (user, session))

    def _index(self, user: str, session: str, manifest: dict, file: Path) -> None:
        now, stat = time.time(), file.stat()
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user, session) DO UPDATE SET "
                "file = excluded.file, updated = excluded.updated, writes = excluded.writes, "
                "injections = excluded.injections, bytes = excluded.bytes",
                (user, session, str(file.relative_to(self.root)), now, stat.st_mtime,
                 manifest["write_count"], len(manifest["injections"]), stat.st_size),
            )  # fmt: skip

    def exists(self, user: str, session: str) -> bool:
        if session == DEFAULT_SESSION:
            return True
        with self._lock:
            row = self._db.execute("SELECT 1 FROM sessions WHERE user = ? AND session = ?", (user, session)).fetchone()
        return row is not None

    def sessions(self, user: str) -> list[dict]:
        """The user's saved sessions, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT session, created, updated, writes, injections, bytes FROM sessions WHERE user = ? "
                "ORDER BY created, session",
                (user,),
            ).fetchall()
        keys = ("session", "created", "updated", "writes", "injections", "bytes")
        return [dict(zip(keys, row)) for row in rows]

    def count_sessions(self, user: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM sessions WHERE user = ?", (user,)).fetchone()[0]

    # --- using a state --------------------------------------------------------------------
    @contextmanager
    def read(self, user: str, session: str) -> Iterator[MemoryState]:
        """The state, locked for the block (an unknown session raises `UnknownSession`)."""
        with self._held(user, session) as slot:
            yield self._load(slot, user, session, create=False)

    @contextmanager
    def write(self, user: str, session: str, *, create: bool = True) -> Iterator[Slot]:
        """The state's slot, locked for a change; saved when the block ends, discarded if it raises."""
        with self._held(user, session) as slot:
            self._load(slot, user, session, create=create)
            try:
                yield slot
                self._save(user, session, slot.state)
            except BaseException:
                slot.state = None  # possibly half-changed: the file on disk is the truth
                raise

    def new_state(self) -> MemoryState:
        return self.model.initial_memory(seed=secrets.randbits(31))

    def close(self) -> int:
        """Refuse new work, wait for every read and write in flight (writes save themselves), close the index."""
        with self._lock:
            self._closed = True
            loaded = sum(slot.state is not None for slot in self._slots.values())
            while any(slot.users for slot in self._slots.values()):
                self._lock.wait()
            self._db.close()
        return loaded

    # --- internals ------------------------------------------------------------------------
    @contextmanager
    def _held(self, user: str, session: str) -> Iterator[Slot]:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            slot = self._slots.setdefault((user, session), Slot())
            self._slots.move_to_end((user, session))
            slot.users += 1
        try:
            with slot.lock:
                yield slot
        finally:
            with self._lock:
                slot.users -= 1
                self._evict()
                self._lock.notify_all()

    def _load(self, slot: Slot, user: str, session: str, *, create: bool) -> MemoryState:
        if slot.state is None:
            path = self.path(user, session)
            if path.exists():
                slot.state = MemoryState.load(path, self.model)
            elif create or session == DEFAULT_SESSION:
                slot.state = self.new_state()
            else:
                raise UnknownSession(session)
        return slot.state

    def _save(self, user: str, session: str, state: MemoryState) -> None:
        path = self.path(user, session)
        state.save(path)
        self._index(user, session, {"write_count": state.write_count, "injections": state.injections}, path)

    def _evict(self) -> None:
        """Drop the least recently used states beyond `max_loaded` (all saved already; reloaded on demand)."""
        idle = [key for key, slot in self._slots.items() if slot.users == 0]
        for key in idle[: max(0, len(self._slots) - self.max_loaded)]:
            del self._slots[key]
