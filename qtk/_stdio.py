"""stdout belongs to qtk's result (a path, or one JSON document)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

__all__ = ["stdout_to_stderr", "output_to_file"]


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
