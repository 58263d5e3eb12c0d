"""Durable, atomic file system steps: the one place qtk writes a file "all or nothing".

* :func:`write_atomic` (bytes or text) and :func:`write_json`: a temporary in the same directory,
  written, fsynced, renamed over the target, then the directory fsynced: after a crash or a power loss
  the target holds the old content or the new, never a mix, and once the call returns the new content
  survives a power loss. ``durable=False`` keeps the atomic rename and skips both fsyncs (progress
  records rewritten many times a second); ``mode`` sets the permissions before the first byte (tokens).
* :func:`seal`: a **completion record**. Every file and directory under a directory is fsynced, then the
  record is written durably, last. A reader that finds the record can trust every byte beside it, even
  after a power loss (without the fsyncs the record could reach the disk before the data it vouches for).
* :func:`install_dir`: put a finished directory in place of another, never leaving neither. Where the
  kernel and the file system have ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15: ext4, xfs, btrfs,
  tmpfs...) the two swap in one atomic step; elsewhere (NFS) the old one is renamed aside, the new one
  renamed in, and the old one removed: a crash between the two renames leaves the old directory at the
  aside name, which the caller restores (see :mod:`qtk.quantize._output`). Without a target,
  ``RENAME_NOREPLACE`` refuses to replace one that appeared meanwhile.
* :func:`replace_durable`: a rename made durable (both parents fsynced).
* :func:`fs_now`: the file system's clock (its server's, on NFS), to age files another host wrote.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import secrets
import shutil
from pathlib import Path

__all__ = ["write_atomic", "write_json", "fs_now", "fsync_dir", "fsync_file", "fsync_tree", "seal", "install_dir",
           "replace_durable", "rename_noreplace", "exchange", "remove"]

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``directory`` durable (a no-op where directories cannot be synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file someone else wrote (and closed) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    """A temporary beside ``path``, unique across processes and threads."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes | str, *, durable: bool = True, mode: int | None = None,
                 tmp: str | os.PathLike | None = None, dir_fd: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (and durably, unless ``durable=False``).

    The temporary is created with 0666 less the umask (a team cache stays group-writable), or with
    ``mode`` exactly, set before the first byte is written. ``tmp`` names the temporary (it must be in the
    same directory; a caller whose cleanup recognises its temporaries by name passes its own); it is
    removed if anything fails. ``dir_fd``: ``path`` is a name in the directory open as ``dir_fd`` (one a
    caller reached without following links): nothing above it is resolved again, and the temporary is
    created there new (``O_EXCL | O_NOFOLLOW``)."""
    path = Path(path)
    if dir_fd is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tmp) if tmp is not None else _tmp_path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    flags = os.O_TRUNC if dir_fd is None else os.O_EXCL | os.O_NOFOLLOW
    at = {} if dir_fd is None else {"dir_fd": dir_fd}
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | flags, 0o666 if mode is None else mode, **at)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path, **({} if dir_fd is None else {"src_dir_fd": dir_fd, "dst_dir_fd": dir_fd}))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path, **at)
        raise
    if durable and dir_fd is None:
        fsync_dir(path.parent)
    elif durable:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 2, newline: bool = True, **kwargs) -> None:
    """:func:`write_atomic` of strict JSON (:func:`qtk._json.dumps`: non-finite floats as ``null``) (+ a newline)."""
    from . import _json

    text = _json.dumps(obj, indent=indent) + ("\n" if newline else "")
    write_atomic(path, text, **kwargs)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file and every directory under ``root`` (``root`` last). Symlinks are
    entries of their directory (made durable with it); their targets are not followed."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(dirpath)


def seal(directory: str | os.PathLike, record: str, data: bytes | str) -> Path:
    """Write the completion record ``directory/record`` after every byte under ``directory`` is on disk."""
    directory = Path(directory)
    fsync_tree(directory)
    write_atomic(directory / record, data, durable=True)
    return directory / record


@functools.cache
def _renameat2():
    """libc's renameat2 (glibc >= 2.28), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True if done, False where the kernel, libc or file system lacks it;
    any other failure raises OSError."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap ``a`` and ``b`` in one atomic step; False where that is not supported (nothing changed)."""
    return _rename2(Path(a), Path(b), _RENAME_EXCHANGE)


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``, refusing (FileExistsError) when ``dst`` exists; atomic where
    ``RENAME_NOREPLACE`` is supported, else checked just before the rename."""
    src, dst = Path(src), Path(dst)
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def replace_durable(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace(src, dst)``, then both directories fsynced: the rename survives a power loss."""
    src, dst = Path(src), Path(dst)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def remove(path: str | os.PathLike) -> None:
    """Remove a file, a symlink or a directory tree; nothing if it is absent."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def install_dir(new: str | os.PathLike, dest: str | os.PathLike, *, aside: str | os.PathLike,
                overwrite: bool) -> str:
    """Make the finished directory ``new`` the one at ``dest``; returns how ("new", "exchanged",
    "renamed aside"). Without ``overwrite`` an existing ``dest`` raises FileExistsError. With it, the old
    ``dest`` is swapped out atomically where possible, else renamed to ``aside`` first (the caller
    restores ``aside`` if a crash leaves no ``dest``), and removed once the new one is durably in place."""
    new, dest, aside = Path(new), Path(dest), Path(aside)
    if not overwrite or not os.path.lexists(dest):
        rename_noreplace(new, dest)
        fsync_dir(dest.parent)
        return "new"
    if exchange(new, dest):
        fsync_dir(dest.parent)
        remove(new)  # holds the old directory now
        return "exchanged"
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    fsync_dir(dest.parent)  # the new one durably in place before the old one goes
    remove(aside)
    return "renamed aside"


def fs_now(directory: str | os.PathLike) -> float:
    """The current time of the file system holding ``directory``: the mtime of a file touched just now (the
    file server's clock on NFS, the clock every mtime there is written with: host clocks need not agree)."""
    from ._proc import host_id

    probe = Path(directory) / f".clock-{host_id()}-{os.getpid()}-{secrets.token_hex(3)}"
    with open(probe, "a"):
        pass
    os.utime(probe)
    try:
        return os.stat(probe).st_mtime
    finally:
        probe.unlink(missing_ok=True)
