"""File digests: the one place qtk hashes a file on disk.

Two algorithms, the two the Hub names files by: ``sha256`` (an LFS file's oid, a blob's name in the HF
cache) and ``git-sha1``, the git blob sha1 (sha1 of ``blob <size>\\0`` then the bytes: a regular file's
oid and ETag). Files are read in :data:`CHUNK` pieces into one reused buffer (``hashlib`` releases the
GIL on each piece, so threads hashing different files run in parallel).

Used by ``qtk cache verify`` and the cache's presence checks (:func:`qtk.hub.cache.digest_file`), the
mirror's hash index (:mod:`qtk.mirror.hashindex`) and quantize's source and output digests
(:mod:`qtk.quantize.source`, :mod:`qtk.quantize.gguf`). ``qtk pull`` hashes while it downloads, with
:func:`new_digest`'s objects fed from its own buffers (:mod:`qtk.hub._fetch.hasher`). :func:`tree_digest`
names a directory's contents (the vendored converter's pinned tree, ``qtk verify --tasks``' task folders in
provision's verify key).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Container, Iterable

__all__ = ["SHA256", "GIT_SHA1", "CHUNK", "new_digest", "file_digests", "file_digest", "file_sha256", "tree_digest",
           "TreeTooLarge"]

SHA256 = "sha256"
GIT_SHA1 = "git-sha1"
CHUNK = 8 * 1024 * 1024


def new_digest(algo: str, size: int):
    """A hashlib object for ``algo`` over ``size`` bytes still to come: ``sha256``, or ``git-sha1``
    (its ``blob <size>\\0`` header already fed)."""
    if algo == SHA256:
        return hashlib.sha256()
    if algo == GIT_SHA1:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
        return h
    raise ValueError(f"unknown digest algorithm {algo!r}")


def file_digests(file: str | os.PathLike | int, algos: Iterable[str] = (SHA256,), *, size: int | None = None,
                 progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """``{algo: hex digest}`` of a whole file, read once whatever the number of algorithms.

    ``file``: a path (opened here, links followed) or an open file descriptor (read with ``pread`` from
    byte 0; its offset is left alone). ``size``: the length the caller knows the file has (a stat it
    trusts); default: the length when it is opened. A file whose length is not that when read to its
    end raises OSError (it changed while being hashed). ``progress(n)`` is called after each piece."""
    fd = file if isinstance(file, int) else os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        expected = os.fstat(fd).st_size if size is None else size
        hashers = {a: new_digest(a, expected) for a in dict.fromkeys(algos)}
        buf = bytearray(CHUNK)
        offset = 0
        with memoryview(buf) as view:
            while n := _pread_into(fd, buf, offset):
                for h in hashers.values():
                    h.update(view[:n])
                offset += n
                if progress:
                    progress(n)
    finally:
        if not isinstance(file, int):
            os.close(fd)
    if offset != expected:
        raise OSError(f"the file changed while being hashed ({offset} bytes read, {expected} expected)")
    return {a: h.hexdigest() for a, h in hashers.items()}


def _pread_into(fd: int, buf: bytearray, offset: int) -> int:
    """Bytes read into ``buf`` at ``offset`` (0 at the end): ``preadv`` into the reused buffer, or ``pread``
    and a copy where the platform has no ``preadv``."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, len(buf), offset)
    buf[: len(data)] = data
    return len(data)


def file_digest(file: str | os.PathLike | int, algo: str = SHA256, **kw) -> str:
    """One digest of a whole file (:func:`file_digests`)."""
    return file_digests(file, (algo,), **kw)[algo]


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (links followed)."""
    return file_digest(path, SHA256)


class TreeTooLarge(ValueError):
    """:func:`tree_digest`: the files hold more than ``max_bytes`` (nothing was hashed)."""

    def __init__(self, root: Path, total: int, max_bytes: int) -> None:
        super().__init__(f"{root} holds more than {max_bytes} bytes")
        self.root, self.total, self.max_bytes = root, total, max_bytes


def _is_bytecode(rel: Path) -> bool:
    return "__pycache__" in rel.parts or rel.suffix == ".pyc"


def tree_digest(root: str | os.PathLike, *, exclude: Container[str] = (), max_bytes: int | None = None) -> str:
    """sha256 over the regular files under ``root``: ``<relative path>\\0<file sha256>\\n`` for each, in
    sorted order (links to files followed, links to directories not). Left out: the bytecode Python writes
    beside the sources it imports (``__pycache__/``, ``*.pyc``: a run must not change what names its
    inputs) and the relative paths in ``exclude``. ``max_bytes``: :class:`TreeTooLarge` before anything
    is read when the files hold more."""
    root = Path(root)
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not _is_bytecode(rel) and rel.as_posix() not in exclude:
            files.append((rel.as_posix(), p))
    if max_bytes is not None and (total := sum(p.stat().st_size for _, p in files)) > max_bytes:
        raise TreeTooLarge(root, total, max_bytes)
    h = hashlib.sha256()
    for rel, p in files:
        h.update(f"{rel}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()
