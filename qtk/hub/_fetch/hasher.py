"""Hashing files while they download: the sha256 (LFS) or git blob sha1 of every file, computed in file order
by one thread that follows the written prefix of each file, so the digest is ready when the last byte lands.

The hasher is off the receive path: workers only tell it (a queue put) when the written prefix of a file has
grown by :data:`~.task.HASH_STEP` or a range is complete. It reads the part file back through one read-only
``mmap`` per file: hashlib reads the page cache directly, without the GIL (measured here: 0.07 s of system time
per GiB, against 0.4 s for ``pread`` into a buffer), and what was hashed is dropped from the mapping
(``MADV_DONTNEED``: the page cache keeps it, the process's RSS stays flat). It follows the *written prefix*
(complete ranges, then the written head of the next range), not only complete ranges, so on a file cut into
ranges over 16 connections it starts with the first MiB instead of after a quarter of the file. Progress is
reported after every ``HASH_PIECE`` (workers that wait for the hasher, see :mod:`.task`, go on sooner), and
each hashed piece is handed to the kernel's writeback at once (:func:`start_writeback`): the fsync that
makes the file durable before it is placed then waits for little (0.01-0.05 s instead of 0.25-0.3 s for
512 MiB here).

Threads: ``_maps`` belongs to the hasher thread; other threads call :meth:`release` and :meth:`release_all`
only once the thread has stopped (or for a task never submitted).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import queue
import threading
from typing import TYPE_CHECKING, Callable

from ..._digest import new_digest

if TYPE_CHECKING:
    from .task import FileTask

__all__ = ["new_hasher", "Hasher", "HASH_PIECE"]

HASH_PIECE = 16 * 1024 * 1024  # bytes per hashlib update (and per madvise)


def new_hasher(digest: tuple[str, str], size: int):
    """A hashlib object for ``digest``'s algorithm (:func:`qtk._digest.new_digest`: ``sha256``, or ``git-sha1``)."""
    return new_digest(digest[0], size)


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None. Python's os module does not offer it."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` to disk now, without waiting: the
    fsync before the file is placed then has little left to do (it took 0.25-0.4 s for 512 MiB here,
    written back all at once). A hint: where it is not available, nothing happens."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class _Map:
    """A read-only map of one part file."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        self.view = memoryview(self.mm)

    def hash(self, h, start: int, end: int) -> None:
        h.update(self.view[start:end])
        start_writeback(self.fd, start, end - start)
        if hasattr(mmap, "MADV_DONTNEED"):  # unmap what was hashed: RSS stays flat (the page cache keeps it)
            low = start - start % mmap.PAGESIZE
            self.mm.madvise(mmap.MADV_DONTNEED, low, end - low)

    def close(self) -> None:
        self.view.release()
        self.mm.close()


class Hasher:
    """One thread; :meth:`submit` a task when it may have new bytes to hash. ``on_complete(task)`` runs on
    the hasher thread once a file is written and hashed completely; an exception goes to ``fail``."""

    def __init__(self, on_complete: Callable[["FileTask"], None], fail: Callable[[BaseException], None]) -> None:
        self._on_complete = on_complete
        self._fail = fail
        self._q: queue.Queue = queue.Queue()
        self._maps: dict[int, _Map] = {}  # id(task) -> map
        self._thread = threading.Thread(target=self._run, name="qtk-hash", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, task: "FileTask") -> None:
        self._q.put(task)

    def stop(self, timeout: float) -> bool:
        """Stop after what is queued; True if the thread ended within ``timeout``."""
        self._q.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (task := self._q.get()) is not None:
            try:
                self.advance(task)
            except BaseException as exc:
                self._fail(exc)

    def advance(self, task: "FileTask") -> None:
        """Hash what ``task`` has written beyond its hashing position; finish the file if that was all."""
        while (got := task.hashable()) is not None:
            h, start, end, fd = got
            m = self._maps.get(id(task))
            if m is None:
                m = self._maps[id(task)] = _Map(fd, task.size)
            for s in range(start, end, HASH_PIECE):  # progress after each piece: waiting workers go on sooner
                e = min(end, s + HASH_PIECE)
                m.hash(h, s, e)
                if not task.hashed(h, e):
                    break  # hashing started over (bytes written again): the next hashable() says from where
        if task.take_complete():
            self.release(task)
            self._on_complete(task)

    def release(self, task: "FileTask") -> None:
        """Unmap ``task``'s part file (hasher thread, or after :meth:`stop`)."""
        m = self._maps.pop(id(task), None)
        if m is not None:
            m.close()

    def release_all(self) -> None:
        for key in list(self._maps):
            self._maps.pop(key).close()
