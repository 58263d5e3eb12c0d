"""One file being fetched: its ranges, what is written, and how far it is hashed.

Three kinds of thread share a :class:`FileTask`: the workers write its ranges (one writer per range), the
hasher reads back the written prefix in file order, and the main thread (or the hasher, on a re-fetch) plans
its layout and records its state file. Who may touch what:

* set before the task is shared, then only read: ``job``, ``lock``, ``urls``, ``size``, ``digest``,
  ``state_path`` (``urls`` has its own lock);
* under ``mu`` (``changed`` is a Condition on it; every method takes it): the layout (``gen``, ``chunk``,
  ``ranges``, ``single``), the progress (``done``, ``partial``, ``writers``, ``dirty``, ``durable``), the
  hashing position (``hash``, ``hash_pos``, ``hash_claim``, ``hash_told``, ``hash_reported``) and the
  lifecycle flags (``finished``, ``refetched``);
* ``fd`` is read and written under ``mu`` too; it is opened (:meth:`open_part`) before any range is
  queued and closed (:meth:`close_part`) only where no worker can hold a range of the file (it is hashed
  completely, or the workers are joined), so a worker may keep using the number :meth:`begin_range` gave it.

A *generation* is one layout: ranges re-planned (a server that ignores ``Range``, a re-fetch from zero)
start a new one, and whatever a worker of an older generation still does is dropped (:class:`Stale`).

The digest always covers the bytes on disk: bytes are hashed only once written and reported
(:meth:`wrote`), and when bytes the hasher has taken, or may be reading (``hash_claim``), are about to be
written again, hashing starts over with a new hash object; whatever the hasher still feeds the old one
is dropped (:meth:`hashed` returns False).

Flow control: the hasher is one thread among ``connections`` + 1, and a fair scheduler gives it one share,
so on a CPU-bound machine it fell behind and hashed most of a file after the last byte arrived (0.6-1.2 s
for 512 MiB at load 6-7 here, with one core idle meanwhile). A worker now waits while more than
``HASH_LAG_MAX`` bytes are ready to hash (:meth:`wait_for_hasher`): the download then ends with the hash
0.1-0.2 s behind it. Bytes written past a range still missing are not ready, so they never hold a worker.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from .._lock import Lock
from .hasher import new_hasher
from .job import FetchJob
from .ranges import Layout
from .resolver import URLResolver
from .session import Stop
from .state import Progress, state_path

__all__ = ["FileTask", "Stale", "HASH_STEP", "HASH_LAG_MAX"]

HASH_STEP = 4 * 1024 * 1024  # the hasher is told when the written prefix has grown by this much
HASH_LAG_MAX = 64 * 1024 * 1024  # workers wait while more than this is written and ready, but not hashed yet


class Stale(Exception):
    """The file's ranges were re-planned: drop this range (the new ones are queued)."""


class FileTask:
    def __init__(self, job: FetchJob, lock: Lock, urls: URLResolver) -> None:
        self.job, self.lock, self.urls = job, lock, urls
        self.size, self.digest = job.size, job.digest
        self.state_path: Path = state_path(job.part_path)
        self.fd = -1
        self.mu = threading.Lock()
        self.changed = threading.Condition(self.mu)
        self.gen = 0
        self.chunk = 0
        self.ranges: tuple[tuple[int, int], ...] = ()
        self.single = False  # the server ignores Range: the file is one range, streamed whole
        self.done: set[int] = set()
        self.partial: dict[int, int] = {}  # range index -> bytes written from its start
        self.writers: dict[int, int] = {}  # generation -> ranges being written
        self.dirty = False
        self.durable: Progress | None = None  # progress confirmed by fdatasync
        self.hash = new_hasher(job.digest, job.size)
        self.hash_pos = 0  # bytes hashed, from the start of the file
        self.hash_told = 0  # written prefix the hasher was last told about
        self.hash_claim = 0  # the hasher may be reading bytes up to here (>= hash_pos)
        self.hash_reported = False  # this hashing pass was reported complete
        self.finished = False
        self.refetched = False

    # -------------------------------------------------------------- layout (main thread)

    def open_part(self) -> int:
        with self.mu:
            if self.fd < 0:  # mode 0666 less the umask: group caches resume
                self.fd = os.open(self.job.part_path, os.O_RDWR | os.O_CREAT, 0o666)
            return self.fd

    def close_part(self) -> int:
        """Forget the descriptor and return it (-1 if none) for the caller to close."""
        with self.mu:
            fd, self.fd = self.fd, -1
            return fd

    def is_single(self) -> bool:
        with self.mu:
            return self.single

    def start_generation(self, layout: Layout) -> int:
        """Adopt ``layout`` (what is written included) as a new generation; hashing starts over."""
        with self.mu:
            self.gen += 1
            self.chunk, self.ranges = layout.chunk, layout.ranges
            self.done, self.partial = set(layout.done), dict(layout.partial)
            self._restart_hash()
            self.durable = None
            self.dirty = True
            return self.gen

    def replan_single(self, gen: int) -> int | None:
        """The server answered a Range request with the whole file: it ignores Range. The file becomes
        one range streamed from byte 0; returns the new generation (None if another worker did it)."""
        with self.mu:
            if self.gen != gen or self.single:
                return None
            self.single = True
            self.gen += 1
            self.chunk = max(self.size, 1)
            self.ranges = ((0, self.size),)
            self.done, self.partial = set(), {}
            self._restart_hash()
            self.dirty = True
            return self.gen

    def pending(self) -> tuple[int, list[int]]:
        """The generation and the ranges not written yet."""
        with self.mu:
            return self.gen, [i for i in range(len(self.ranges)) if i not in self.done]

    # -------------------------------------------------------------- ranges (workers)

    def wanted(self, i: int, gen: int) -> int | None:
        """Bytes of range ``i`` written so far, or None if it is written or was re-planned."""
        with self.mu:
            return None if self.gen != gen or i in self.done else self.partial.get(i, 0)

    def begin_range(self, i: int, gen: int) -> tuple[int, int, int, int]:
        """``(start, end, resume position, fd)`` of range ``i``; counts this worker as its writer until
        :meth:`end_range`."""
        with self.mu:
            if self.gen != gen:
                raise Stale
            start, end = self.ranges[i]
            self.writers[gen] = self.writers.get(gen, 0) + 1
            return start, end, start + self.partial.get(i, 0), self.fd

    def end_range(self, gen: int) -> None:
        with self.changed:
            self.writers[gen] -= 1
            self.changed.notify_all()

    def check(self, gen: int) -> None:
        with self.mu:
            if self.gen != gen:
                raise Stale

    def restart_range(self, i: int, gen: int) -> None:
        """Range ``i`` is written again from its start (a whole-file answer to a resumed request)."""
        with self.mu:
            if self.gen != gen:
                raise Stale
            self.partial.pop(i, None)
            if self.hash_claim > self.ranges[i][0]:  # bytes the hasher took or is reading will change
                self._restart_hash()

    def wrote(self, i: int, gen: int, upto: int) -> bool:
        """Range ``i`` is written up to byte ``upto`` of the file. True when the hasher should be told
        (this range holds the hashing position and ``HASH_STEP`` more bytes are ready)."""
        with self.mu:
            if self.gen != gen:
                raise Stale
            start = self.ranges[i][0]
            self.partial[i] = upto - start
            self.dirty = True
            if start <= self.hash_pos and upto - max(self.hash_pos, self.hash_told) >= HASH_STEP:
                self.hash_told = upto
                return True
            return False

    def range_done(self, i: int, gen: int, stop: threading.Event) -> None:
        with self.changed:
            if self.gen != gen:
                raise Stale
            while self._older_writers():  # single stream: writers of the ranges planned before may still write
                if stop.is_set():
                    raise Stop
                self.changed.wait(0.1)
                if self.gen != gen:
                    raise Stale
            self.done.add(i)
            self.partial.pop(i, None)
            self.dirty = True

    def _restart_hash(self) -> None:
        self.hash = new_hasher(self.digest, self.size)  # what the hasher still does with the old one is dropped
        self.hash_pos = self.hash_told = self.hash_claim = 0
        self.hash_reported = False

    def _older_writers(self) -> bool:
        return any(n for g, n in self.writers.items() if g < self.gen)

    # -------------------------------------------------------------- hashing (hasher thread)

    def hashable(self) -> tuple[object, int, int, int] | None:
        """``(hash object, from, to, fd)``: written bytes after the hashing position, contiguous from it
        (complete ranges, then the written head of the next one), or None if there are none. While writers
        of an older layout may still write, only complete ranges count."""
        with self.mu:
            if self.finished:
                return None
            end = self._hashable_end()
            if end <= self.hash_pos:
                return None
            self.hash_claim = max(self.hash_claim, end)  # the hasher may read up to here from now on
            return self.hash, self.hash_pos, end, self.fd

    def _hashable_end(self) -> int:
        pos = self.hash_pos
        if pos >= self.size or not self.ranges:
            return pos
        i, end = pos // self.chunk, pos
        while i < len(self.ranges) and i in self.done:
            end = self.ranges[i][1]
            i += 1
        if i < len(self.ranges) and not self._older_writers():
            end = max(end, self.ranges[i][0] + self.partial.get(i, 0))
        return end

    def hashed(self, hasher: object, upto: int) -> bool:
        """``hasher`` has taken every byte up to ``upto``; False (and ignored) if hashing started over meanwhile."""
        with self.changed:
            if hasher is not self.hash:
                return False
            self.hash_pos = upto
            self.changed.notify_all()  # workers waiting for the hasher to catch up
            return True

    def hash_lag(self) -> int:
        """Bytes written and ready to hash that the hasher has not taken yet."""
        with self.mu:
            return 0 if self.finished else self._hashable_end() - self.hash_pos

    def wait_for_hasher(self, lag: int, stop: threading.Event, tell: Callable[[], None]) -> None:
        """Wait while more than ``lag`` bytes wait for the hasher (flow control: a worker that runs ahead of
        it only takes CPU time the hasher needs). ``tell`` wakes the hasher first."""
        tell()
        with self.changed:
            while not self.finished and not stop.is_set() and self._hashable_end() - self.hash_pos > lag:
                self.changed.wait(0.05)

    def take_complete(self) -> bool:
        """True once per hashing pass: when every range is written and hashed (the digest is final)."""
        with self.mu:
            if self.finished or self.hash_reported or self.hash_pos < self.size or len(self.done) < len(self.ranges):
                return False
            self.hash_reported = True
            return True

    def hexdigest(self) -> str:
        with self.mu:
            return self.hash.hexdigest()

    # -------------------------------------------------------------- state file, lifecycle

    def may_write_state(self) -> bool:
        return not self.lock.lost  # the state file belongs to the lock holder only

    def take_progress(self, sync: bool) -> tuple[Progress, Progress | None, int, int] | None:
        """``(progress now, durable progress, fd, range size)`` if the state file needs writing."""
        with self.mu:
            if self.finished or self.fd < 0:
                return None
            now = Progress(tuple(sorted(self.done)), dict(self.partial))
            if not (self.dirty or sync and self.durable != now):
                return None
            self.dirty = False
            return now, self.durable, self.fd, self.chunk

    def set_durable(self, progress: Progress) -> None:
        with self.mu:
            self.durable = progress

    def covered(self) -> int:
        """Bytes written so far (complete ranges + the written head of the others)."""
        with self.mu:
            return self._covered()

    def _covered(self) -> int:
        return sum(e - s for i, (s, e) in enumerate(self.ranges) if i in self.done) + sum(self.partial.values())

    def remaining(self) -> int:
        """Bytes still to write (0 once finished)."""
        with self.mu:
            return 0 if self.finished else self.size - self._covered()

    def set_finished(self) -> bool:
        """Mark the file finished (placed or dropped); False if it already was."""
        with self.mu:
            was, self.finished = self.finished, True
            return not was

    def is_finished(self) -> bool:
        with self.mu:
            return self.finished

    def mark_refetch(self) -> bool:
        """Note a re-fetch from zero; False if the file was re-fetched once already."""
        with self.mu:
            was, self.refetched = self.refetched, True
            return not was
