"""The bulk byte path: parallel HTTP Range requests into preallocated part files, resumable across
processes, hash-verified before anything is moved into place.

One module per responsibility, each readable alone:

=================  =====================================================================================
``ranges``         how a file is cut into ranges, and how recorded bytes map onto a new cut (pure)
``state``          the ``<part>.state.json`` sidecar: format, reading, the one writer (:class:`StateFlusher`)
``session``        HTTP: the urllib3 pool, where the token goes, shared ``Retry-After``, what answers mean
``body``           reading a body into the caller's buffer (the one private attribute of another library)
``resolver``       a file's signed download URL, resolved again once per expiry
``task``           one file's shared state (layout, progress, hashing position) and its lock discipline
``hasher``         the thread that hashes each file's written prefix in order, while it downloads
``workers``        the worker threads: GET a range, read it, ``pwrite`` it, retry
``fetcher``        :class:`Fetcher`: locks, plans, runs the threads, places or re-fetches each file
``job``            what the fetcher is given and reports (:class:`FetchJob`, :class:`FetchStats`)
=================  =====================================================================================

Per file: ``<part>`` is preallocated to the final size and written in place with ``os.pwrite``; the file
is cut into ranges sized from its size and the number of connections (up to four full rounds over the
connections, 2-64 MiB each); the state file records what is written, flushed every 50 ms and made durable
(``fdatasync``) every 5 s, so a re-run after ``kill -9``, Ctrl-C, a network failure or a reboot resumes
from what was finished, also when it cuts the file differently; a per-file lock (:mod:`qtk.hub._lock`)
keeps two processes, also on two hosts, off the same part file. The sha256 (LFS) or git blob sha1 (small
files) is computed while the file downloads; a mismatch is re-fetched once from zero, then reported, and a
bad file is never handed to ``on_complete``.

Every wait is bounded (see :mod:`qtk.hub._retry`): connect/read timeouts, ``Retry-After`` honoured up to a
cap and shared by all connections to that origin, a fixed number of attempts without progress, and a
minimum transfer rate per connection (:mod:`qtk.hub._rate`). A server that ignores ``Range`` gets the file
in one stream. A full disk stops the pull with :class:`~qtk.errors.DiskSpaceError` (exit 40) and keeps the
partial for the next run.
"""

from __future__ import annotations

from .fetcher import DEFAULT_CONNECTIONS, Fetcher
from .hasher import new_hasher
from .job import FetchJob, FetchStats, ProgressSink
from .ranges import DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK, chunk_size_for
from .state import resumable_bytes

__all__ = [
    "new_hasher", "resumable_bytes", "chunk_size_for", "FetchJob", "FetchStats", "Fetcher", "ProgressSink",
    "DEFAULT_CHUNK", "DEFAULT_CONNECTIONS", "MIN_CHUNK", "MAX_CHUNK",
]
