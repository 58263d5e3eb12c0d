"""Progress displays: downloads (one bar per active file plus a total with MB/s and ETA), and the steps
of quantize / verify (layer i/N, window i/N with ETA and peak memory)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

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

__all__ = ["RichDownloadProgress", "StepProgress", "backend_session"]


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


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StepProgress:
    """``progress(stage, done, total, peak_bytes)`` callbacks -> one line per stage.

    On a terminal the line is redrawn in place (rich); elsewhere (logs, CI, pipes) a line is printed
    when a stage starts and at each quarter, so a 30-layer quantization takes five lines, not thirty.
    ``enabled=False`` (``--quiet`` / ``--json``) prints nothing."""

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        self.console, self.enabled = console, enabled
        self._stage: str | None = None
        self._t0 = 0.0
        self._quarter = -1
        self._live: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, stage: str, done: int, total: int, peak_bytes: int | None = None,
                 unit: str | None = None) -> None:
        """``unit``: also show the rate, ``N.N <unit>/s`` (verify's tasks: documents per second)."""
        if not self.enabled:
            return
        if stage != self._stage:
            self.close()
            self._stage, self._t0, self._quarter = stage, time.monotonic(), -1
            if self.console.is_terminal:
                self._live = Progress(TextColumn("{task.description}"), BarColumn(bar_width=30),
                                      TextColumn("{task.fields[status]}"), console=self.console, transient=False,
                                      redirect_stdout=False, redirect_stderr=False)  # backends' prints stay in the log
                self._live.start()
                self._task = self._live.add_task(f"  {stage}", total=total, status="")
        status = self._status(done, total, peak_bytes, unit)
        if self._live is not None and self._task is not None:
            self._live.update(self._task, completed=done, total=total, status=status)
            return
        quarter = 4 * done // max(total, 1)
        if quarter > self._quarter:
            self._quarter = quarter
            self.console.print(f"  {stage}: {status}", markup=False, highlight=False)

    def _status(self, done: int, total: int, peak_bytes: int | None, unit: str | None = None) -> str:
        elapsed = time.monotonic() - self._t0
        parts = [f"{done}/{total}", _duration(elapsed)]
        if unit and done and elapsed > 0:
            parts.append(f"{done / elapsed:.1f} {unit}/s")
        if 0 < done < total:
            parts.append(f"ETA {_duration(elapsed / done * (total - done))}")
        if peak_bytes:
            parts.append(f"peak {peak_bytes / 1e9:.2f} GB")
        return " · ".join(parts)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
        self._live, self._task, self._stage = None, None, None


@contextlib.contextmanager
def backend_session(out, command: str, name: str, *, verbose: bool) -> Iterator[StepProgress]:
    """Run a heavy command quietly: backends' output into a per-run log file (its path printed first),
    qtk's messages and progress on the terminal. ``verbose``: backends print live, no log file. An
    error raised inside still reaches the user with qtk's message, and names the log."""
    from .. import errors
    from .._stdio import backend_output, run_log_path

    path = None if verbose else run_log_path(command, name)
    if path is not None:
        out.info(f"[dim]backend output: {path}[/dim]")
    saved = out.err.file
    with backend_output(path) as term:
        out.err.file = term
        progress = StepProgress(out.err, enabled=not (out.quiet or out.json_mode))
        try:
            yield progress
        except errors.QtkError as exc:
            if path is not None:
                exc.hint = f"{exc.hint + ' ' if exc.hint else ''}Backend output: {path}"
            raise
        except Exception:
            if path is not None:
                out.err.print(f"Backend output of this run: {path}", markup=False, highlight=False)
            raise
        finally:
            progress.close()
            out.err.file = saved
