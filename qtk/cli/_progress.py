"""A rich progress display for downloads: one bar per active file plus a total with MB/s and ETA."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["RichDownloadProgress"]


class RichDownloadProgress:
    """Implements qtk.hub._fetch.ProgressSink. Use as a context manager."""

    def __init__(self, console: Console, total_bytes: int, already: int = 0, label: str = "total") -> None:
        self._progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(bar_width=None),
            DownloadColumn(binary_units=False),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            refresh_per_second=8,
        )
        self._total = self._progress.add_task(f"[bold]{label}", total=total_bytes, completed=already)
        self._files: dict[str, TaskID] = {}
        self._done_in_file: dict[str, int] = {}
        self._mu = threading.Lock()

    def __enter__(self) -> "RichDownloadProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def file_started(self, key: str, label: str, total: int, completed: int) -> None:
        with self._mu:
            old = self._files.pop(key, None)
            if old is not None:  # a re-fetch from zero: take its bytes back off the total
                self._progress.update(self._total, advance=-self._done_in_file.get(key, 0) + completed)
                self._progress.remove_task(old)
            name = label if len(label) <= 40 else "…" + label[-39:]
            self._files[key] = self._progress.add_task(f"  {name}", total=total, completed=completed)
            self._done_in_file[key] = completed

    def advance(self, key: str, nbytes: int) -> None:
        task = self._files.get(key)
        if task is not None:
            self._progress.update(task, advance=nbytes)
            self._done_in_file[key] = self._done_in_file.get(key, 0) + nbytes
        self._progress.update(self._total, advance=nbytes)

    def file_finished(self, key: str) -> None:
        with self._mu:
            task = self._files.pop(key, None)
            if task is not None:
                self._progress.remove_task(task)

    def message(self, text: str) -> None:
        self._progress.console.print(text)
