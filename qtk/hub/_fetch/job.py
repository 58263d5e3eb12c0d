"""What the fetcher is given and what it reports: :class:`FetchJob`, :class:`FetchStats`, :class:`ProgressSink`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Protocol

from .._errors import HubContext

__all__ = ["FetchJob", "FetchStats", "ProgressSink", "NullProgress", "Counters"]


@dataclass(frozen=True)
class FetchJob:
    """One file to fetch. ``digest`` is ``("sha256", hex)`` or ``("git-sha1", hex)``."""

    key: str  # unique, e.g. the path in the repo
    url: str
    size: int
    digest: tuple[str, str]
    part_path: Path
    lock_path: Path
    ctx: HubContext
    on_complete: Callable[[Path], None]  # moves the verified part file into place
    is_done: Callable[[], bool] = lambda: False  # another process may finish it first


@dataclass
class FetchStats:
    bytes_downloaded: int = 0  # bytes that crossed the network (re-fetches included)
    bytes_resumed: int = 0  # bytes reused from earlier runs' part files
    files_fetched: int = 0
    files_skipped: int = 0  # finished by another process while we waited for the lock
    retries: int = 0
    resolves: int = 0  # download URLs resolved on the endpoint (a signed URL that expired costs one)
    refetches: int = 0  # whole-file re-downloads after a hash mismatch
    slow_restarts: int = 0  # connections cut for being slower than the minimum rate (QTK_MIN_RATE)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Counters:
    """The :class:`FetchStats` of one fetch, counted by every thread: each update and each read holds ``_mu``."""

    def __init__(self) -> None:
        self._stats = FetchStats()
        self._mu = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._mu:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    def snapshot(self, **overrides) -> FetchStats:
        with self._mu:
            return replace(self._stats, **overrides)


class ProgressSink(Protocol):
    def file_started(self, key: str, label: str, total: int, completed: int) -> None: ...
    def advance(self, key: str, nbytes: int) -> None: ...
    def file_finished(self, key: str) -> None: ...
    def message(self, text: str) -> None: ...


class NullProgress:
    def file_started(self, key, label, total, completed):
        pass

    def advance(self, key, nbytes):
        pass

    def file_finished(self, key):
        pass

    def message(self, text):
        pass
