"""The part file's sidecar state, ``<part>.state.json``: what a run wrote, so that the next run resumes.

Format (version 1), one JSON object::

    {"version": 1, "size": <bytes>, "digest": ["sha256", "<hex>"], "chunk_size": <range size>,
     "boot_id": "<kernel boot id>", "done": [<range index>...], "partial": {"<range index>": <bytes>},
     "durable_done": [...], "durable_partial": {...}}

``done``/``partial`` hold what was written (the page cache has it: it survives ``kill -9``);
``durable_done``/``durable_partial`` what an ``fdatasync`` vouched for (it survives a reboot too). After a
reboot (another ``boot_id``) only the durable part counts. A state for another size or digest, of another
version, without a usable ``chunk_size``, or without its part file is ignored: the file starts over. Entries
that do not parse (``done`` not a list, ``partial`` not an object, an index or count that is not a finite
whole number) are skipped, and a partial never counts past its own range.

:class:`StateFlusher` is the one writer of state files. It rewrites every file's state at most every
``STATE_FLUSH_S`` (which bounds what a ``kill -9`` loses) from whichever thread asks, and makes it durable
every ``STATE_SYNC_S`` from the main thread only (an fdatasync can take seconds; workers must not wait on it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

from ..._fs import write_atomic
from ..._proc import boot_id
from .ranges import Span, merge

__all__ = ["STATE_VERSION", "STATE_FLUSH_S", "STATE_SYNC_S", "Progress", "state_path", "read", "covered",
           "recorded", "resumable_bytes", "encode", "write", "StateFlusher"]

STATE_VERSION = 1
STATE_FLUSH_S = 0.05  # also bounds what a kill -9 loses
STATE_SYNC_S = 5.0  # fdatasync + durable record this often (reboot safety without a per-write cost)
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class Progress:
    """What is written: range indices done, and range index -> bytes written from its start."""

    done: tuple[int, ...] = ()
    partial: dict[int, int] = field(default_factory=dict)


def state_path(part_path: Path) -> Path:
    return part_path.with_name(part_path.name + ".state.json")


def read(part_path: Path, size: int, digest: tuple[str, str]) -> dict | None:
    """The sidecar state of ``part_path`` if it belongs to this exact file, else None."""
    try:
        doc = json.loads(state_path(part_path).read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    if (
        not isinstance(doc, dict)
        or doc.get("version") != STATE_VERSION
        or doc.get("size") != size
        or doc.get("digest") != list(digest)
        or not isinstance(doc.get("chunk_size"), int)
        or doc["chunk_size"] < 1
        or not part_path.exists()
    ):
        return None  # stale or foreign: start over
    return doc


def covered(doc: dict, size: int) -> list[Span]:
    """The byte ranges ``[start, end)`` a state says are written, merged and sorted.

    Independent of how the next run cuts the file: a state written with 16 MiB ranges resumes
    under 3 MiB ranges and vice versa. After a reboot only what an fdatasync vouched for counts.
    """
    cs = doc["chunk_size"]
    key = "" if doc.get("boot_id") == boot_id() else "durable_"
    spans = []
    done = doc.get(key + "done")
    for i in done if isinstance(done, list) else ():
        if isinstance(i, int) and 0 <= i * cs < size:
            spans.append((i * cs, min(size, (i + 1) * cs)))
    partial = doc.get(key + "partial")
    for k, v in partial.items() if isinstance(partial, dict) else ():
        try:
            i, n = int(k), int(v)
        except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
            continue
        if 0 <= i * cs < size and n > 0:
            spans.append((i * cs, min(size, i * cs + min(n, cs))))
    return merge(spans)


def recorded(part_path: Path, size: int, digest: tuple[str, str]) -> tuple[int, list[Span]] | None:
    """``(range size it was written with, written spans)`` of an earlier run, or None."""
    doc = read(part_path, size, digest)
    return None if doc is None else (doc["chunk_size"], covered(doc, size))


def resumable_bytes(part_path: Path, size: int, digest: tuple[str, str], chunk_size: int | None = None) -> int:
    """How many bytes of ``part_path`` an earlier run finished (0 if none or stale).

    ``chunk_size`` is not needed (the state records the range size it was written with); it is
    accepted so that callers written for the fixed-range versions keep working.
    """
    found = recorded(part_path, size, digest)
    return 0 if found is None else sum(e - s for s, e in found[1])


def encode(size: int, digest: tuple[str, str], chunk: int, now: Progress, durable: Progress | None) -> str:
    durable = durable or Progress()
    return json.dumps({
        "version": STATE_VERSION,
        "size": size,
        "digest": list(digest),
        "chunk_size": chunk,
        "boot_id": boot_id(),
        "done": list(now.done),
        "partial": {str(k): v for k, v in now.partial.items()},
        "durable_done": list(durable.done),
        "durable_partial": {str(k): v for k, v in durable.partial.items()},
    })


def write(path: Path, text: str) -> None:
    """Replace ``path`` atomically; on a full disk, overwrite it in place within its own blocks
    (so the progress of a pull stopped by ENOSPC is still recorded for the resume)."""
    tmp = path.with_name(path.name + ".tmp")
    # padded with spaces (JSON ignores them) to whole 4 KiB blocks with room to grow: the in-place
    # rewrite below then never needs a block the file does not have
    text += " " * (-(len(text) + 1024) % 4096 + 1024)
    try:
        write_atomic(path, text, durable=False, tmp=tmp)  # not fsynced: rewritten many times a second
        return
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno not in DISK_FULL:
            raise
    data = text.encode()
    with contextlib.suppress(OSError), open(path, "r+b") as fh:
        st = os.fstat(fh.fileno())
        if len(data) <= st.st_blocks * 512:  # fits the blocks it already has: no allocation
            fh.write(data + b" " * max(0, st.st_size - len(data)))  # JSON ignores trailing spaces


class Recordable(Protocol):
    """What the flusher needs of a file being fetched (:class:`~.task.FileTask`)."""

    size: int
    digest: tuple[str, str]
    state_path: Path

    def may_write_state(self) -> bool: ...
    def take_progress(self, sync: bool) -> tuple[Progress, Progress | None, int, int] | None: ...
    def set_durable(self, progress: Progress) -> None: ...


class StateFlusher:
    """The one writer of state files.

    ``_mu`` (reentrant) is held while a state file is written, by :meth:`flush` and by :meth:`exclusive`
    (a file being finished: no state is written for it once its part file is placed); ``_last`` and
    ``_last_sync`` are read and written under it.
    """

    def __init__(self, clock=time.monotonic) -> None:
        self._mu = threading.RLock()
        self._clock = clock
        self._last = self._last_sync = clock()

    def flush(self, task: Recordable, *, sync: bool = False) -> None:
        """Write ``task``'s state now if it changed. Without ``sync`` it survives kill -9 (the page cache
        does); with ``sync`` an fdatasync first makes the recorded progress survive a reboot too."""
        with self._mu:
            if not task.may_write_state():  # the state file belongs to the lock holder only
                return
            got = task.take_progress(sync)
            if got is None:
                return
            now, durable, fd, chunk = got
            if sync:
                with contextlib.suppress(OSError):
                    os.fdatasync(fd)  # everything recorded in ``now`` was written before this call
                    durable = now
                    task.set_durable(now)
            write(task.state_path, encode(task.size, task.digest, chunk, now, durable))

    def periodic(self, tasks: Callable[[], Iterable[Recordable]], *, may_sync: bool) -> None:
        """Flush every task of ``tasks()`` if ``STATE_FLUSH_S`` has passed since the last time, and make
        them durable if ``may_sync`` and ``STATE_SYNC_S`` has passed. Never waits for another thread."""
        if not self._mu.acquire(blocking=False):
            return
        try:
            now = self._clock()
            sync = may_sync and now - self._last_sync >= STATE_SYNC_S
            if not sync and now - self._last < STATE_FLUSH_S:
                return
            for t in tasks():
                self.flush(t, sync=sync)
            self._last = now
            if sync:
                self._last_sync = now
        finally:
            self._mu.release()

    @contextlib.contextmanager
    def exclusive(self):
        """No state file is written while in this block."""
        with self._mu:
            yield
