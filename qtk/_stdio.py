"""stdout belongs to qtk's result (a path, or one JSON document); the terminal's stderr to qtk's own
progress and messages; backends' chatter to a per-run log file (``backend_output``)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Iterator, TextIO

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["stdout_to_stderr", "output_to_file", "backend_output", "run_log_path"]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what backends print (banners, tables) to stderr, at the file-descriptor level so that
    native code is caught too."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def output_to_file(path: os.PathLike | str | None) -> Iterator[None]:
    """Send everything written to stdout and stderr (Python and native code alike) to ``path``
    while the block runs; ``None`` leaves both alone. For backends' chatter in unattended runs."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)


def run_log_path(command: str, name: str = "") -> "Path":
    """A fresh per-run log file for backends' output: $QTK_LOG_DIR, else $XDG_STATE_HOME/qtk/logs,
    else ~/.local/state/qtk/logs; named <UTC time>-<command>[-name]-<pid>.log."""
    import re
    import time
    from pathlib import Path

    base = os.environ.get("QTK_LOG_DIR") or Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "qtk" / "logs"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:60]
    return Path(base) / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{command}{'-' + safe if safe else ''}-{os.getpid()}.log"


@contextlib.contextmanager
def backend_output(path: "os.PathLike | str | None") -> Iterator[TextIO]:
    """Keep the terminal for qtk's own story while backends run.

    With ``path``: everything else written while the block runs — file descriptors 1 and 2 (native
    code, handlers that hold the original streams) and Python's ``sys.stdout``/``sys.stderr``
    (prints, warnings, progress bars) — goes to the file. Yields the stream that still reaches the
    terminal's stderr: qtk's progress and messages go there. ``None``: backends print live, stdout
    moved to stderr (``-v``)."""
    if path is None:
        with stdout_to_stderr():
            yield sys.stderr
        return
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        real_fds = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test runner's in-memory stream
        real_fds = False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    enc = getattr(sys.stderr, "encoding", None) or "utf-8"
    term = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding=enc, errors="replace") if real_fds else sys.stderr
    log = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    old = sys.stdout, sys.stderr
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = log
        yield term
    finally:
        with contextlib.suppress(Exception):
            log.flush()
        sys.stdout, sys.stderr = old
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)
        log.close()
        if term is not old[1]:
            term.close()
