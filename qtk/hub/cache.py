"""Where pulled files go: the standard Hugging Face cache layout, or a plain local directory.

Cache layout (the one huggingface_hub, transformers and vLLM read, offline included)::

    $HF_HUB_CACHE/models--ns--name/
        blobs/<sha256 or git-sha1>          the bytes, named by content
        snapshots/<commit>/<path>           relative symlinks into blobs/
        refs/<branch or tag>                the commit a name pointed to when pulled
        .qtk/verified/<oid>                 qtk's record that it hashed this blob (see below)
    $HF_HUB_CACHE/.locks/models--ns--name/  lock files

Every name that becomes a path is validated first (:mod:`qtk.hub.names`): oids are 40/64 hex,
commits 40 hex, refs follow git's rules, file paths stay inside the snapshot and never name a dot
directory (:func:`~qtk.hub.names.check_pull_path`).

Nothing is written through a symbolic link below the snapshot folder or the ``--local-dir``: the plan
refuses a listing whose files would land under an existing link (or under a file, or on a directory)
(:meth:`CacheTarget.check_layout`), and placing walks from that root one directory at a time with
``O_NOFOLLOW`` (``openat``), so a link that appears after the plan is refused too, never followed.
The root itself may be a link (the user chose it).

Presence means "a blob qtk verified", never "a file of the right size": after an OS crash a
full-size blob may hold zeros. A blob counts as present when its ``.qtk/verified/<oid>`` record
matches the blob's inode, size and mtime. Blobs qtk placed get that record right after the blob's
rename (blob fsynced, directory fsynced, then the record); blobs someone else placed (``hf
download``, an older qtk, a torn write) are hashed once and recorded if they match. On a read-only
cache the record is not written, and the hash is simply repeated the next time.

Part files (``*.qtk-part`` + ``.state.json``) live beside their final place, so the final
``os.replace`` is an atomic rename on one filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from .. import errors
from .._digest import file_digest
from .._fs import fsync_dir, write_atomic
from .names import (
    PATH_PART_MAX, check_commit_sha, check_oid, check_pull_path, check_pull_tree, is_commit_sha, is_oid, is_pull_path,
    tree_conflict,
)

__all__ = [
    "RemoteFile", "CacheTarget", "LocalDirTarget", "repo_folder_name", "is_commit_sha", "digest_file",
    "fsync_dir", "not_writable", "PART_SUFFIX", "MARKER_DIR",
]

PART_SUFFIX = ".qtk-part"
LOCK_SUFFIX = ".lock"  # --local-dir only; the cache's locks are named by oid
META_SUFFIX = ".json"
# every name qtk derives from a file's path in --local-dir/.cache/qtk/download (the lock module may add
# ".excl..." to a lock's name: derived from the lock's own name, so unique when the lock's is)
BOOKKEEPING_SUFFIXES = (META_SUFFIX, PART_SUFFIX, PART_SUFFIX + ".state.json", PART_SUFFIX + ".state.json.tmp",
                        LOCK_SUFFIX)
MARKER_DIR = Path(".qtk") / "verified"
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits on one name and on a whole path (with its NUL)
PRESENT, MISSING, DAMAGED = "present", "missing", "damaged"
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    """``models--ns--name`` (huggingface_hub's own helper, so the layout cannot drift)."""
    from huggingface_hub.file_download import repo_folder_name as _hf_repo_folder_name

    return _hf_repo_folder_name(repo_id=repo_id, repo_type=repo_type)


@dataclass(frozen=True)
class RemoteFile:
    """A file in a repo at a pinned commit, as the tree listing describes it."""

    path: str
    size: int
    oid: str  # sha256 for LFS files, git blob sha1 otherwise
    lfs: bool

    @property
    def digest(self) -> tuple[str, str]:
        return ("sha256", self.oid) if self.lfs else ("git-sha1", self.oid)


def not_writable(exc: OSError, where: Path | str) -> errors.NotWritableError | None:
    """The qtk error for an OSError that says ``where`` cannot be written (None for other errors)."""
    if isinstance(exc, errors.QtkError) or exc.errno not in _NOT_WRITABLE:
        return None
    why = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
    return errors.NotWritableError(
        f"Cannot write to {where} ({why}: {exc.filename or where}).",
        hint="Point HF_HUB_CACHE / --cache-dir (or --local-dir) at a directory you can write, or ask the cache's "
        "owner to pull it: a repo that is fully present is used from a read-only cache without writing.",
    )


def _unique() -> str:
    """A temp-name suffix unique across processes and threads (two pulls may run in one process)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _through_link(base: Path, where: str, exc: OSError | None = None) -> errors.UnsafePathError:
    return errors.UnsafePathError(
        f"Refusing to write {where} under {base}: a part of that path is a symbolic link or not a directory "
        f"({exc.strerror if exc else 'it changed after the plan'}); qtk never writes through links there.",
        hint=f"Nothing was written there. Replace the link with a real directory (or remove the file in the way), "
        "or point --local-dir at the link's target.",
    )


@contextlib.contextmanager
def _parent_dir(base: Path, rel: str):
    """An fd of the directory that holds ``base/rel``, reached from ``base`` one part at a time with
    ``O_NOFOLLOW`` (missing directories are created), and the last part: nothing below ``base`` is
    followed if it is a symbolic link, however it got there (:class:`~qtk.errors.UnsafePathError`)."""
    parts = rel.split("/")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    Path(base).mkdir(parents=True, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
                nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _through_link(base, rel, exc) from None
        raise
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def _relative_symlink(target: Path, base: Path, rel: str) -> None:
    """Create (or atomically replace) ``base/rel`` -> ``target`` as a relative symlink, without following a
    link below ``base``; writes nothing if it is right."""
    link = base / rel
    want = os.path.relpath(target, link.parent)
    with _parent_dir(base, rel) as (fd, name):
        with contextlib.suppress(OSError):
            if os.readlink(name, dir_fd=fd) == want:
                return
        tmp = f".{name}.{_unique()}.tmp-link"
        os.symlink(want, tmp, dir_fd=fd)
        try:
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise


def _write_atomic_under(base: Path, rel: str, text: str) -> None:
    """:func:`qtk._fs.write_atomic` for ``base/rel``, reached without following a link below ``base``."""
    with _parent_dir(base, rel) as (fd, name):
        write_atomic(name, text, dir_fd=fd)


def check_placement(base: Path, rel: str, seen: dict[Path, bool]) -> None:
    """Refuse (UnsafePathError, before anything is written) a file ``rel`` whose place below ``base`` is
    blocked: a directory on the way that is a symbolic link or a file, or the place itself a directory.
    ``seen`` remembers the directories already checked (one ``lstat`` per directory per plan). A path
    whose whole name (with room for qtk's longest record suffix) is over the kernel's ``PATH_MAX`` is
    refused too: ``lstat`` and ``open`` of it fail with ENAMETOOLONG."""
    full = len(os.fsencode(os.path.join(os.path.abspath(base), rel)))
    if full + (NAME_MAX - PATH_PART_MAX) >= PATH_MAX:
        raise errors.UnsafePathError(
            f"Refusing to write {rel[:120]!r}...: below {base} its path is {full} bytes long; the file system "
            f"takes at most {PATH_MAX - 1}, less room for qtk's records ({NAME_MAX - PATH_PART_MAX}).",
            hint="Nothing was written. Pull into a shorter --local-dir or cache path, or leave the file out "
            "(--exclude); if you did not expect such a name, report it to the endpoint.",
        )
    parts = rel.split("/")
    d = Path(base)
    for part in parts[:-1]:
        d = d / part
        if d in seen:
            if not seen[d]:
                return  # does not exist: nothing below it does
            continue
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            seen[d] = False
            return
        if stat.S_ISLNK(st.st_mode):
            raise errors.UnsafePathError(
                f"Refusing to write {rel!r}: {d} is a symbolic link (to {os.readlink(d)!r}), and qtk never writes "
                f"through links below {base}.",
                hint="Nothing was written. Replace the link with a real directory, or point --local-dir at its "
                "target.",
            )
        if not stat.S_ISDIR(st.st_mode):
            raise errors.UnsafePathError(
                f"Refusing to write {rel!r}: {d} is a file, not a directory.",
                hint="Nothing was written. Move that file away (it is not part of this revision's layout).",
            )
        seen[d] = True
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if stat.S_ISDIR(os.lstat(d / parts[-1]).st_mode):
            raise errors.UnsafePathError(
                f"Refusing to write {rel!r}: {d / parts[-1]} is a directory.",
                hint="Nothing was written. Move that directory away (it is not part of this revision's layout).",
            )


def digest_file(path: Path, digest: tuple[str, str]) -> str:
    """The file's digest in ``digest``'s algorithm (``sha256`` or ``git-sha1``: :mod:`qtk._digest`), to
    compare with its oid."""
    return file_digest(path, digest[0])


def _same_file(record: dict, st: os.stat_result) -> bool:
    return (record.get("size"), record.get("ino"), record.get("mtime_ns")) == (st.st_size, st.st_ino, st.st_mtime_ns)


class CacheTarget:
    """The standard HF cache layout under ``hub_cache``."""

    kind = "cache"

    def __init__(self, hub_cache: Path, repo_id: str, repo_type: str = "model") -> None:
        self.hub_cache = Path(hub_cache)
        folder = repo_folder_name(repo_id, repo_type)
        self.repo_dir = self.hub_cache / folder
        self.locks_dir = self.hub_cache / ".locks" / folder

    # -- paths (every name validated: a hostile endpoint cannot reach outside the repo folder)

    def blob_path(self, f: RemoteFile) -> Path:
        return self.repo_dir / "blobs" / check_oid(f.oid)

    def marker_path(self, oid: str) -> Path:
        return self.repo_dir / MARKER_DIR / check_oid(oid)

    def visible_path(self, commit: str, f: RemoteFile) -> Path:
        return self.root(commit) / check_pull_path(f.path)

    def root(self, commit: str) -> Path:
        return self.repo_dir / "snapshots" / check_commit_sha(commit)

    def check_layout(self, commit: str, files: list[RemoteFile]) -> None:
        """Before anything is written: the paths can all be files at once, and none lands under a link,
        under a file or on a directory in the snapshot folder (UnsafePathError, exit 21)."""
        check_pull_tree(check_pull_path(f.path) for f in files)
        seen: dict[Path, bool] = {}
        for f in files:
            check_placement(self.root(commit), f.path, seen)

    def part_path(self, f: RemoteFile) -> Path:
        return self.repo_dir / "blobs" / (check_oid(f.oid) + PART_SUFFIX)

    def lock_path(self, f: RemoteFile) -> Path:
        return self.locks_dir / f"{check_oid(f.oid)}.qtk.lock"

    # -- presence

    def _blob_stat(self, f: RemoteFile) -> os.stat_result | None:
        """The blob's stat if it is a regular file of the right size (a symlink only into
        huggingface_hub's shared store ``$HF_HUB_CACHE/blobs``), else None."""
        blob = self.blob_path(f)
        try:
            st = os.lstat(blob)
            if stat.S_ISLNK(st.st_mode):
                real = Path(os.path.realpath(blob))
                if not real.is_relative_to(Path(os.path.realpath(self.hub_cache)) / "blobs"):
                    return None
                st = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
            return None
        return st

    def status(self, commit: str, f: RemoteFile, *, verify: bool = False) -> str:
        """``present`` (a verified blob), ``missing``, or ``damaged`` (the blob's bytes do not hash to its name).
        ``verify`` re-hashes even blobs qtk already verified."""
        st = self._blob_stat(f)
        if st is None:
            return DAMAGED if self.blob_path(f).exists() else MISSING
        if not verify and self._marked(f.oid, st):
            return PRESENT
        if digest_file(self.blob_path(f), f.digest) != f.oid:
            return DAMAGED
        self._mark(f, st, adopted=True)
        return PRESENT

    def is_present(self, commit: str, f: RemoteFile, *, verify: bool = False) -> bool:
        return self.status(commit, f, verify=verify) == PRESENT

    def _marked(self, oid: str, st: os.stat_result) -> bool:
        try:
            record = json.loads(self.marker_path(oid).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and record.get("oid") == oid and _same_file(record, st)

    def _mark(self, f: RemoteFile, st: os.stat_result, *, adopted: bool) -> None:
        """Record that the blob (as it is now: inode, size, mtime) hashes to its name. Best effort on a
        read-only cache: the blob is then hashed again next time."""
        record = {"oid": f.oid, "algorithm": f.digest[0], "size": st.st_size, "ino": st.st_ino,
                  "mtime_ns": st.st_mtime_ns, "source": "adopted" if adopted else "qtk"}
        try:
            write_atomic(self.marker_path(f.oid), json.dumps(record))
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:
                raise

    # -- placement

    def place(self, commit: str, files: list[RemoteFile], part: Path) -> None:
        """Move a verified part file into ``blobs/`` and link every path that has this content.
        The part file was fsynced; the rename is made durable before the verified record is written."""
        f = files[0]
        blob = self.blob_path(f)
        marker = self.marker_path(f.oid)
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()  # a record for a blob being replaced must not vouch for the new one early
        os.replace(part, blob)
        fsync_dir(blob.parent)
        self._mark(f, os.stat(blob), adopted=False)
        for g in files:
            _relative_symlink(blob, self.root(commit), check_pull_path(g.path))

    def finalize(self, revision: str | None, commit: str, files: list[RemoteFile]) -> None:
        """Snapshot links and ``refs/<revision>``; writes only what differs (read-only caches stay untouched)."""
        for f in files:
            _relative_symlink(self.blob_path(f), self.root(commit), check_pull_path(f.path))
        ref = revision or "main"
        if not is_commit_sha(ref):  # as huggingface_hub: names get a ref, shas do not
            path = self.repo_dir / "refs" / ref
            try:
                current = path.read_text()
            except (OSError, UnicodeDecodeError):
                current = None
            if current != commit:
                write_atomic(path, commit)

    # -- offline ---------------------------------------------------------------

    def resolve_offline(self, revision: str | None) -> str | None:
        ref = revision or "main"
        if is_commit_sha(ref):
            return ref if (self.repo_dir / "snapshots" / ref).is_dir() else None
        try:
            commit = (self.repo_dir / "refs" / ref).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None
        return commit if is_commit_sha(commit) else None

    def cached_files(self, commit: str) -> list[RemoteFile]:
        """Files of a cached snapshot. The oid is the blob name the link points to (links that do not
        point at a well-named blob of this repo are skipped)."""
        snap = self.root(commit)
        blobs = os.path.normpath(self.repo_dir / "blobs")
        out: list[RemoteFile] = []
        for p in sorted(snap.rglob("*")):
            if not p.is_symlink():
                continue
            target = os.path.normpath(os.path.join(p.parent, os.readlink(p)))
            oid = os.path.basename(target)
            if os.path.dirname(target) != blobs or not is_oid(oid) or not is_pull_path(p.relative_to(snap).as_posix()):
                continue
            try:
                size = p.stat().st_size
            except OSError:
                continue
            out.append(RemoteFile(p.relative_to(snap).as_posix(), size, oid, lfs=len(oid) == 64))
        return out


class LocalDirTarget:
    """Files placed at ``local_dir/<path>``; bookkeeping under ``local_dir/.cache/qtk``."""

    kind = "local_dir"

    def __init__(self, local_dir: Path) -> None:
        self.local_dir = Path(local_dir)
        self.meta_dir = self.local_dir / ".cache" / "qtk" / "download"
        self.locks_dir = self.meta_dir

    def visible_path(self, commit: str, f: RemoteFile) -> Path:
        return self.local_dir / check_pull_path(f.path)

    def root(self, commit: str) -> Path:
        return self.local_dir

    def part_path(self, f: RemoteFile) -> Path:
        return self.meta_dir / (check_pull_path(f.path) + PART_SUFFIX)

    def lock_path(self, f: RemoteFile) -> Path:
        return self.meta_dir / (check_pull_path(f.path) + LOCK_SUFFIX)

    def _meta_path(self, f: RemoteFile) -> Path:
        return self.meta_dir / self._meta_rel(f)

    @staticmethod
    def _meta_rel(f: RemoteFile) -> str:
        return check_pull_path(f.path) + META_SUFFIX

    def check_layout(self, commit: str, files: list[RemoteFile]) -> None:
        """Before anything is written: the paths can all be files at once, their records in
        ``.cache/qtk/download`` do not share a name (``a`` and ``a.qtk-part.state`` would), and nothing
        lands under a link, under a file or on a directory below ``--local-dir`` (UnsafePathError, exit 21)."""
        paths = [check_pull_path(f.path) for f in files]
        check_pull_tree(paths)
        owners: dict[str, list[str]] = {}
        for path in paths:
            for suffix in BOOKKEEPING_SUFFIXES:
                owners.setdefault(path + suffix, []).append(path)
        if conflict := tree_conflict(name for name, who in owners.items() for _ in who):
            a, b = conflict
            first, second = (owners[a] + [w for w in owners[b] if w not in owners[a]])[:2]
            raise errors.UnsafePathError(
                f"Refusing the remote file names {first!r} and {second!r}: qtk's records of the two in "
                f"{self.meta_dir} would collide ({a!r} and {b!r}).",
                hint="Nothing was written. Pull them one at a time (--exclude), or into the cache.",
            )
        seen: dict[Path, bool] = {}
        meta_rel = self.meta_dir.relative_to(self.local_dir).as_posix()
        for path in paths:
            check_placement(self.local_dir, path, seen)
            check_placement(self.local_dir, f"{meta_rel}/{path}{META_SUFFIX}", seen)

    def status(self, commit: str, f: RemoteFile, *, verify: bool = False) -> str:
        final = self.visible_path(commit, f)
        try:
            st = os.lstat(final)
        except (FileNotFoundError, NotADirectoryError):
            return MISSING
        if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
            return DAMAGED
        if not verify:
            try:
                meta = json.loads(self._meta_path(f).read_text())
                if meta.get("oid") == f.oid and meta.get("mtime_ns") == st.st_mtime_ns:
                    return PRESENT
            except (OSError, ValueError):
                pass
        # A file we did not place (or that was touched): adopt it only if its content matches.
        if digest_file(final, f.digest) != f.oid:
            return DAMAGED
        try:
            self._write_meta(commit, f)
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:
                raise
        return PRESENT

    def is_present(self, commit: str, f: RemoteFile, *, verify: bool = False) -> bool:
        return self.status(commit, f, verify=verify) == PRESENT

    def _write_meta(self, commit: str, f: RemoteFile) -> None:
        with _parent_dir(self.local_dir, check_pull_path(f.path)) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        meta_rel = self.meta_dir.relative_to(self.local_dir).as_posix()
        _write_atomic_under(
            self.local_dir, f"{meta_rel}/{self._meta_rel(f)}",
            json.dumps({"oid": f.oid, "size": f.size, "commit": commit, "mtime_ns": st.st_mtime_ns}),
        )

    def place(self, commit: str, files: list[RemoteFile], part: Path) -> None:
        """Rename the verified part file to ``--local-dir/<path>``; the directories on the way are opened
        with ``O_NOFOLLOW`` from ``--local-dir``, so a link planted there is refused, never followed."""
        (f,) = files  # one part file per path here
        with _parent_dir(self.local_dir, check_pull_path(f.path)) as (fd, name):
            os.replace(part, name, dst_dir_fd=fd)
            with contextlib.suppress(OSError):
                os.fsync(fd)
        self._write_meta(commit, f)

    def finalize(self, revision: str | None, commit: str, files: list[RemoteFile]) -> None:
        pass
