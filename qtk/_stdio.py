"""stdout belongs to qtk's result (a path, or one JSON document)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

__all__ = ["stdout_to_stderr"]


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
