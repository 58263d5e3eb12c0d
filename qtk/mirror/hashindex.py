"""The mirror's persistent hash index: each file content is hashed once, across restarts.

A row is keyed on the real file's identity and version, ``(st_dev, st_ino, st_size, st_mtime_ns,
st_ctime_ns)``: a file rewritten in place, replaced by a rename, re-linked or touched gets a new key
(ctime moves on every write, rename onto it, link count or mode change), so a republished file can
never inherit an old hash. Values: sha256 of the content and, once needed, its git blob sha1.

Storage is SQLite (WAL) under a state directory: ``DIR/.qtk-serve/`` when the served directory is
writable, otherwise a per-directory folder under the user's cache (or ``--index-dir``). The mirror
never serves dot-entries, so the index is never visible to clients.

**The index is trusted: whoever can write it chooses the hashes the mirror announces.** A row whose key
matches a file's current metadata is used without reading the file (that is the point of the index),
so a row planted with the right key and a wrong sha256 would be served as the file's ETag and
``X-Linked-Etag`` (a client that checks content, ``qtk pull``, then refuses the file; one that checks
only the size, ``hf download``, keeps it). A row for an earlier version of a file is never used: any
write, rename onto it, re-link or chmod moves its ctime, so the key no longer matches and the file is
hashed again. The defence against planted rows is who may write: the state directory is created mode
0700 and the database 0600 (its ``-wal``/``-shm`` files inherit that); at start a directory that is not
a real directory owned by the serving user is refused (the default location then falls back to the
user's cache; an explicit ``--index-dir`` is an error), and a database, WAL or shared-memory file that is
not a regular file owned by the serving user, or that group or others could write (or sat in such a
directory), is deleted and rebuilt (every file is hashed again) rather than trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat as stat_mod
import threading
from pathlib import Path
from typing import Callable

from .._digest import GIT_SHA1, SHA256, file_digests

__all__ = ["FileKey", "HashIndex", "IndexNotTrusted", "file_key", "hash_file", "default_index_dir", "private_dir"]

log = logging.getLogger("qtk.mirror")

FileKey = tuple[int, int, int, int, int]
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
    """(sha256, git blob sha1 or None) of an open file of ``size`` bytes (:func:`qtk._digest.file_digests`:
    OSError if it is not that long any more)."""
    d = file_digests(fd, (SHA256, GIT_SHA1) if sha1 else (SHA256,), size=size, progress=progress)
    return d[SHA256], d.get(GIT_SHA1)


SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's companions of a database file


class IndexNotTrusted(PermissionError):
    """The index directory is not a real directory owned by the serving user."""


def _euid() -> int:
    return os.geteuid()


def _own_dir(path: Path) -> os.stat_result:
    """Create ``path`` mode 0700, or check an existing one: a real directory (not a symlink) owned by this
    user. Raises :class:`IndexNotTrusted` otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat_mod.S_ISDIR(st.st_mode):
        raise IndexNotTrusted(f"{path} is not a directory (a symlink or a file)")
    if st.st_uid != _euid():
        raise IndexNotTrusted(f"{path} is owned by uid {st.st_uid}, not by the serving user (uid {_euid()})")
    return st


def private_dir(path: Path) -> bool:
    """:func:`_own_dir`, narrowed to mode 0700. True if group or others could write it until now (what
    it holds is not to be trusted)."""
    st = _own_dir(path)
    if stat_mod.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return bool(st.st_mode & 0o022)


def _untrusted(path: str, dir_was_open: bool) -> str | None:
    """Why a database file (or a companion) may not be trusted; None if it may (or does not exist)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat_mod.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != _euid():
        return f"owned by uid {st.st_uid}, not by the serving user"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat_mod.S_IMODE(st.st_mode):o})"
    if dir_was_open:
        return "its directory was writable by group or others"
    if stat_mod.S_IMODE(st.st_mode) != 0o600:
        os.chmod(path, 0o600)
    return None


def _prepare_db(path: Path) -> None:
    """Make ``path`` a database only this user can write: an untrusted one (and its companions) is
    deleted and recreated empty, mode 0600 from the first byte."""
    dir_was_open = private_dir(path.parent)
    files = [str(path)] + [f"{path}{suffix}" for suffix in SIDE_FILES]
    reasons = [(f, why) for f in files if (why := _untrusted(f, dir_was_open))]
    if reasons:
        log.warning("hash index %s is not trusted (%s: %s): rebuilding it (every file is hashed again).",
                    path, os.path.basename(reasons[0][0]), reasons[0][1])
        for f in files:
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return
    os.close(fd)


def default_index_dir(root: Path) -> Path:
    """``ROOT/.qtk-serve`` if it can be written and belongs to this user, else
    ``$XDG_CACHE_HOME/qtk/serve/<hash of ROOT>``. An HF cache (``models--*`` folders) is left untouched:
    huggingface_hub's cache scan would report a foreign folder."""
    own = root / ".qtk-serve"
    try:
        if any(p.name.startswith(("models--", "datasets--", "spaces--")) for p in root.iterdir()):
            raise OSError("an HF cache: keep it clean")
        _own_dir(own)  # its mode is checked (and narrowed) when the index is opened
        probe = own / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return own
    except IndexNotTrusted as exc:
        log.warning("not using %s for the hash index: %s; using the user's cache instead.", own, exc)
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
            _prepare_db(path)
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
