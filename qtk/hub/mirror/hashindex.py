"""The mirror's persistent hash index: each file content is hashed once, across restarts.

A row is keyed on the real file's identity and version, ``(st_dev, st_ino, st_size, st_mtime_ns,
st_ctime_ns)``: a file rewritten in place, replaced by a rename, re-linked or touched gets a new key
(ctime moves on every write, rename onto it, link count or mode change), so a republished file can
never inherit an old hash. Values: sha256 of the content and, once needed, its git blob sha1.

Storage is SQLite (WAL) under a state directory: ``DIR/.qtk-serve/`` when the served directory is
writable, otherwise a per-directory folder under the user's cache (or ``--index-dir``). The mirror
never serves dot-entries, so the index is never visible to clients.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Callable

__all__ = ["FileKey", "HashIndex", "file_key", "hash_file", "default_index_dir"]

log = logging.getLogger("qtk.mirror")

FileKey = tuple[int, int, int, int, int]
READ_SIZE = 4 * 1024 * 1024
_SCHEMA = """
CREATE TABLE IF NOT EXISTS hashes (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL, sha1 TEXT,
    PRIMARY KEY (dev, ino, size, mtime_ns, ctime_ns)
) WITHOUT ROWID;
"""


def file_key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(fd: int, size: int, *, sha1: bool, progress: Callable[[int], None] | None = None) -> tuple[str, str | None]:
    """(sha256, git blob sha1 or None) of an open file's first ``size`` bytes."""
    h256 = hashlib.sha256()
    h1 = hashlib.sha1(b"blob %d\0" % size) if sha1 else None
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(READ_SIZE, size - offset), offset)
        if not chunk:
            raise OSError(f"file shrank while hashing (at {offset} of {size} bytes)")
        h256.update(chunk)
        if h1 is not None:
            h1.update(chunk)
        offset += len(chunk)
        if progress:
            progress(len(chunk))
    return h256.hexdigest(), (h1.hexdigest() if h1 is not None else None)


def default_index_dir(root: Path) -> Path:
    """``ROOT/.qtk-serve`` if it can be written, else ``$XDG_CACHE_HOME/qtk/serve/<hash of ROOT>``. An HF cache
    (``models--*`` folders) is left untouched: huggingface_hub's cache scan would report a foreign folder."""
    own = root / ".qtk-serve"
    try:
        if any(p.name.startswith(("models--", "datasets--", "spaces--")) for p in root.iterdir()):
            raise OSError("an HF cache: keep it clean")
        own.mkdir(exist_ok=True)
        probe = own / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return own
    except OSError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:16]
    return cache / "qtk" / "serve" / tag


class HashIndex:
    """Thread-safe (one connection behind a lock, an in-memory dict in front).

    ``path=None`` keeps the index in memory only (nothing survives a restart)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mu = threading.Lock()
        self._mem: dict[FileKey, tuple[str, str | None]] = {}
        self._inflight: dict[FileKey, threading.Event] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            for row in self._db.execute("SELECT dev, ino, size, mtime_ns, ctime_ns, sha256, sha1 FROM hashes"):
                self._mem[tuple(row[:5])] = (row[5], row[6])  # one read at start, no query per file later

    def close(self) -> None:
        with self._mu:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __len__(self) -> int:
        with self._mu:
            return len(self._mem)

    def get(self, key: FileKey) -> tuple[str, str | None] | None:
        with self._mu:
            return self._mem.get(key)

    def put(self, key: FileKey, sha256: str, sha1: str | None) -> None:
        with self._mu:
            self._mem[key] = (sha256, sha1)
            if self._db is not None:
                self._db.execute("INSERT OR REPLACE INTO hashes VALUES (?,?,?,?,?,?,?)", (*key, sha256, sha1))

    def retain(self, keys: set[FileKey]) -> int:
        """Drop every row whose file version is not in ``keys`` (files replaced or deleted since they were
        hashed); returns how many. Call it only with the keys of a complete walk of the store."""
        with self._mu:
            stale = [k for k in self._mem if k not in keys]
            for k in stale:
                del self._mem[k]
            if self._db is not None and stale:
                self._db.executemany("DELETE FROM hashes WHERE dev=? AND ino=? AND size=? AND mtime_ns=? AND ctime_ns=?",
                                     stale)
        return len(stale)

    def hashes(self, path: str, key: FileKey, *, need_sha1: bool,
               progress: Callable[[int], None] | None = None) -> tuple[str, str | None]:
        """The hashes of the file at ``path`` whose identity is ``key``; computed at most once at a time
        per key (concurrent callers wait for the one hashing). Raises ``OSError`` if the file changed
        (its key no longer matches) or cannot be read."""
        while True:
            hit = self.get(key)
            if hit is not None and (hit[1] is not None or not need_sha1):
                return hit
            with self._mu:
                ev = self._inflight.get(key)
                mine = ev is None
                if mine:
                    ev = self._inflight[key] = threading.Event()
            if not mine:
                ev.wait()
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
                try:
                    if file_key(os.fstat(fd)) != key:
                        raise OSError(f"{path} changed while being indexed")
                    sha256, sha1 = hash_file(fd, key[2], sha1=need_sha1, progress=progress)
                finally:
                    os.close(fd)
                self.put(key, sha256, sha1)
                return sha256, sha1
            finally:
                with self._mu:
                    self._inflight.pop(key, None)
                ev.set()
