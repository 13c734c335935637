"""The memory states of every user and session: on disk, loaded on demand, one lock each.

Layout under the data directory:

    states/<user>/<session>.safetensors            one MemoryState per (user, session), `MemoryState.save`
    states/<user>/<session>.safetensors.damaged    a file that failed its checks, set aside
    states/<user>/<session>.safetensors.journal    the writes since the file, with `journal=True`
    index.sqlite3                                  (user, session) -> file, write count, injections, times

The files are the truth; the index is derived from them (rebuilt from the files' manifests at
start-up, so a crash between saving a file and updating the index heals itself, and rebuilt
whenever it cannot be read) and answers "does this session exist" and "which sessions does this
user have" without touching the files.

A file that fails its checks (at start-up or when loaded) is never read as an empty memory: it is
set aside as `.damaged`, and every request on its session raises `DamagedState`, until the user
resets the session or imports a state into it (`replace`), which never reads the old file.

`read(user, session)` and `write(user, session)` hold the state's lock for the whole block, so
requests on one state are serialised while other states proceed in parallel. A write is saved
(atomically) before its block ends; if the block raises, the in-memory state is dropped and
reloaded from its file on next use, so a failed request never leaves a partial write behind.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..journal import journal_path
from ..modeling import MemoryLLM
from ..persistence import MemoryFileError, read_manifest
from ..state import MemoryState
from .auth import NAME_PATTERN

logger = logging.getLogger("latentmem.server")

DEFAULT_SESSION = "default"  # every user has it; other sessions exist once written
SUFFIX = ".safetensors"
DAMAGED = ".damaged"
COLUMNS = ("user", "session", "file", "created", "updated", "writes", "injections", "bytes", "damaged")
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    user TEXT NOT NULL, session TEXT NOT NULL, file TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, writes INTEGER NOT NULL,
    injections INTEGER NOT NULL, bytes INTEGER NOT NULL, damaged TEXT,
    PRIMARY KEY (user, session)
)"""
UNREADABLE = (11, 26)  # sqlite error codes of a damaged database: SQLITE_CORRUPT, SQLITE_NOTADB


class UnknownSession(LookupError):
    """The user has no session of that name (never written, or a name of another user's)."""


class ShuttingDown(RuntimeError):
    """The registry was closed: no new reads or writes."""


class DamagedState(RuntimeError):
    """The session's file failed its checks and was set aside; only `replace` (reset, import) ends that."""

    def __init__(self, session: str, reason: str):
        super().__init__(session, reason)
        self.session, self.reason = session, reason


@dataclass
class Slot:
    """A loaded (or loadable) state and its lock. `state` may be replaced inside a write."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    state: MemoryState | None = None
    users: int = 0  # threads holding or waiting for `lock`: a slot in use is never evicted


class StateRegistry:
    def __init__(
        self,
        model: MemoryLLM,
        data_dir: str | Path,
        *,
        max_loaded: int = 64,
        journal: bool = False,
        slot_dtype: str | None = None,
    ):
        self.model = model
        # How states are saved (persistence.save_state): `journal` appends each write's change to
        # `<file>.journal` instead of rewriting the file; `slot_dtype="int8"` stores slots as int8.
        # Off by default: an export sends the state file alone, which needs the journal folded in first.
        self.journal, self.slot_dtype = journal, slot_dtype
        self.root = Path(data_dir)
        (self.root / "states").mkdir(parents=True, exist_ok=True)
        self.max_loaded = max_loaded
        # Guards _slots, _db and _closed; notified when a slot is let go. Reentrant: a query that
        # finds the index damaged rebuilds it, and the rebuild queries too.
        self._lock = threading.Condition(threading.RLock())
        self._slots: OrderedDict[tuple[str, str], Slot] = OrderedDict()
        self._closed = False
        self._db = self._open_index()
        self.rebuild_index()

    def path(self, user: str, session: str) -> Path:
        return self.root / "states" / user / f"{session}{SUFFIX}"

    def damaged_path(self, user: str, session: str) -> Path:
        return self.root / "states" / user / f"{session}{SUFFIX}{DAMAGED}"

    # --- the index ------------------------------------------------------------------------
    def _open_index(self) -> sqlite3.Connection:
        file = self.root / "index.sqlite3"
        try:
            return _connect(file)
        except sqlite3.DatabaseError as err:
            stamp = int(time.time())
            for part in (file, file.with_name(f"{file.name}-wal"), file.with_name(f"{file.name}-shm")):
                if part.exists():
                    part.rename(part.with_name(f"{part.name}.unreadable-{stamp}"))
            logger.error("index %s unreadable (%s): set aside, rebuilding it from the state files", file, err)
            return _connect(file)

    def _sql(self, query: str, args: tuple = ()) -> list[tuple]:
        """Run a query on the index; if the index turns out damaged, rebuild it from the files and retry."""
        with self._lock:
            try:
                return self._db.execute(query, args).fetchall()
            except sqlite3.DatabaseError as err:
                if getattr(err, "sqlite_errorcode", None) not in UNREADABLE:
                    raise
                logger.error("index unreadable while serving (%s): rebuilding it", err)
                self._db.close()
                self._db = self._open_index()  # a damaged file fails its quick check: set aside
                self.rebuild_index()
                return self._db.execute(query, args).fetchall()

    def rebuild_index(self) -> None:
        """Make the index match the files: drop rows without a file, (re)read every file's manifest."""
        with self._lock:  # at start-up nothing waits; when serving, saves wait for the rebuild
            found: set[tuple[str, str]] = set()
            for folder in (self.root / "states").iterdir():
                if not folder.is_dir() or not NAME_PATTERN.fullmatch(folder.name):
                    continue
                for leftover in folder.glob(f".*{SUFFIX}.*.tmp"):  # a save interrupted by a crash
                    leftover.unlink(missing_ok=True)
                for file in [*folder.glob(f"*{SUFFIX}"), *folder.glob(f"*{SUFFIX}{DAMAGED}")]:
                    user, session = folder.name, file.name.removesuffix(DAMAGED).removesuffix(SUFFIX)
                    if (user, session) in found or not NAME_PATTERN.fullmatch(session):
                        continue
                    found.add((user, session))
                    self._index_file(user, session)
            for user, session in self._db.execute("SELECT user, session FROM sessions").fetchall():
                if (user, session) not in found:
                    self._db.execute("DELETE FROM sessions WHERE user = ? AND session = ?", (user, session))

    def _index_file(self, user: str, session: str) -> None:
        file, damaged = self.path(user, session), self.damaged_path(user, session)
        if not file.exists():  # set aside earlier; say again why, if the manifest tells
            try:
                read_manifest(damaged)
                reason = "its contents failed their checks when it was loaded"
            except (OSError, MemoryFileError) as err:
                reason = _reason(err, damaged, session)
            self._index_damaged(user, session, reason)
            return
        try:
            self._index(user, session, read_manifest(file), file)
        except MemoryFileError as err:  # never written by us (saves are atomic): keep it aside
            self._quarantine(user, session, err)

    def _index(self, user: str, session: str, manifest: dict, file: Path) -> None:
        now, stat = time.time(), file.stat()
        modified, size = stat.st_mtime, stat.st_size
        if "journal" in manifest or self.journal:  # the writes since the file are in its journal
            try:
                extra = journal_path(file).stat()
                modified, size = max(modified, extra.st_mtime), size + extra.st_size
            except FileNotFoundError:
                pass
        self._sql(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (user, session) DO UPDATE SET "
            "file = excluded.file, updated = excluded.updated, writes = excluded.writes, "
            "injections = excluded.injections, bytes = excluded.bytes, damaged = NULL",
            (user, session, str(file.relative_to(self.root)), now, modified,
             manifest["write_count"], len(manifest["injections"]), size),
        )  # fmt: skip

    def _index_damaged(self, user: str, session: str, reason: str) -> None:
        file = self.damaged_path(user, session)
        now = time.time()
        self._sql(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, 0, 0, 0, ?) ON CONFLICT (user, session) DO UPDATE SET "
            "file = excluded.file, updated = excluded.updated, damaged = excluded.damaged",
            (user, session, str(file.relative_to(self.root)), now, now, reason),
        )

    def _quarantine(self, user: str, session: str, err: Exception) -> DamagedState:
        """Set a file that failed its checks aside (replacing an older damaged copy) and index it as such."""
        file, aside = self.path(user, session), self.damaged_path(user, session)
        os.replace(file, aside)
        reason = _reason(err, file, session)
        logger.error("set aside damaged memory file %s as %s: %s", file, aside.name, err)
        self._index_damaged(user, session, reason)
        return DamagedState(session, reason)

    def exists(self, user: str, session: str) -> bool:
        if session == DEFAULT_SESSION:
            return True
        return bool(self._sql("SELECT 1 FROM sessions WHERE user = ? AND session = ?", (user, session)))

    def sessions(self, user: str) -> list[dict]:
        """The user's saved sessions, oldest first (`damaged`: why its file was set aside, or None)."""
        rows = self._sql(
            "SELECT session, created, updated, writes, injections, bytes, damaged FROM sessions WHERE user = ? "
            "ORDER BY created, session",
            (user,),
        )
        keys = ("session", "created", "updated", "writes", "injections", "bytes", "damaged")
        return [dict(zip(keys, row)) for row in rows]

    def count_sessions(self, user: str) -> int:
        return self._sql("SELECT COUNT(*) FROM sessions WHERE user = ?", (user,))[0][0]

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

    def replace(self, user: str, session: str, state: MemoryState) -> None:
        """Install `state` as the session's memory (saved first), without reading the file it replaces."""
        with self._held(user, session) as slot:
            slot.state = None  # if the save fails, the file on disk stays the truth
            self._save(user, session, state)
            slot.state = state

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
                try:
                    slot.state = MemoryState.load(path, self.model)
                except MemoryFileError as err:
                    raise self._quarantine(user, session, err) from err
            elif self.damaged_path(user, session).exists():
                rows = self._sql("SELECT damaged FROM sessions WHERE user = ? AND session = ?", (user, session))
                raise DamagedState(session, (rows and rows[0][0]) or "its file failed its checks")
            elif create or session == DEFAULT_SESSION:
                slot.state = self.new_state()
            else:
                raise UnknownSession(session)
        return slot.state

    def _save(self, user: str, session: str, state: MemoryState) -> None:
        path = self.path(user, session)
        state.save(path, journal=self.journal, slot_dtype=self.slot_dtype)
        self._index(user, session, {"write_count": state.write_count, "injections": state.injections}, path)

    def _evict(self) -> None:
        """Drop the least recently used states beyond `max_loaded` (all saved already; reloaded on demand)."""
        idle = [key for key, slot in self._slots.items() if slot.users == 0]
        for key in idle[: max(0, len(self._slots) - self.max_loaded)]:
            del self._slots[key]


def _connect(file: Path) -> sqlite3.Connection:
    """The index, checked readable and of the current schema (an older one is rebuilt: it is derived)."""
    db = sqlite3.connect(file, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # the index is rebuilt from the files after a crash
        if db.execute("PRAGMA quick_check").fetchone() != ("ok",):
            raise sqlite3.DatabaseError(f"{file} failed sqlite's quick check")
        if tuple(row[1] for row in db.execute("PRAGMA table_info(sessions)")) not in (COLUMNS, ()):
            db.execute("DROP TABLE sessions")
        db.execute(SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def _reason(err: Exception, file: Path, session: str) -> str:
    """What was wrong with a session's file, without the server's paths."""
    return str(err).replace(str(file), f"the file of session {session!r}")
