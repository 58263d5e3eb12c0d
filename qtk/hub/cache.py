"""Where pulled files go: the standard Hugging Face cache layout, or a plain local directory.

Cache layout (the one huggingface_hub, transformers and vLLM read, offline included)::

    $HF_HUB_CACHE/models--ns--name/
        blobs/<sha256 or git-sha1>          the bytes, named by content
        snapshots/<commit>/<path>           relative symlinks into blobs/
        refs/<branch or tag>                the commit a name pointed to when pulled
        .qtk/verified/<oid>                 qtk's record that it hashed this blob (see below)
    $HF_HUB_CACHE/.locks/models--ns--name/  lock files

Every name that becomes a path is validated first (:mod:`qtk.hub.names`): oids are 40/64 hex,
commits 40 hex, refs follow git's rules, file paths stay inside the snapshot.

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
from ._fetch import new_hasher
from .names import check_commit_sha, check_oid, check_repo_path, is_commit_sha, is_oid

__all__ = [
    "RemoteFile", "CacheTarget", "LocalDirTarget", "repo_folder_name", "is_commit_sha", "digest_file",
    "fsync_dir", "not_writable", "PART_SUFFIX", "MARKER_DIR",
]

PART_SUFFIX = ".qtk-part"
MARKER_DIR = Path(".qtk") / "verified"
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


def fsync_dir(directory: Path) -> None:
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


def _unique() -> str:
    """A temp-name suffix unique across processes and threads (two pulls may run in one process)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _relative_symlink(target: Path, link: Path) -> None:
    """Create (or atomically replace) ``link`` -> ``target`` as a relative symlink; writes nothing if it is right."""
    rel = os.path.relpath(target, link.parent)
    with contextlib.suppress(OSError):
        if os.readlink(link) == rel:
            return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{_unique()}.tmp-link")
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def _write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Temp file + fsync + rename (+ directory fsync): never a half-written file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_unique()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def digest_file(path: Path, digest: tuple[str, str], size: int) -> str:
    h = new_hasher(digest, size)
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


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
        return self.root(commit) / check_repo_path(f.path)

    def root(self, commit: str) -> Path:
        return self.repo_dir / "snapshots" / check_commit_sha(commit)

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
        if digest_file(self.blob_path(f), f.digest, f.size) != f.oid:
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
            _write_atomic(self.marker_path(f.oid), json.dumps(record))
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
            _relative_symlink(blob, self.visible_path(commit, g))

    def finalize(self, revision: str | None, commit: str, files: list[RemoteFile]) -> None:
        """Snapshot links and ``refs/<revision>``; writes only what differs (read-only caches stay untouched)."""
        for f in files:
            _relative_symlink(self.blob_path(f), self.visible_path(commit, f))
        ref = revision or "main"
        if not is_commit_sha(ref):  # as huggingface_hub: names get a ref, shas do not
            path = self.repo_dir / "refs" / ref
            try:
                current = path.read_text()
            except (OSError, UnicodeDecodeError):
                current = None
            if current != commit:
                _write_atomic(path, commit)

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
            if os.path.dirname(target) != blobs or not is_oid(oid):
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
        return self.local_dir / check_repo_path(f.path)

    def root(self, commit: str) -> Path:
        return self.local_dir

    def part_path(self, f: RemoteFile) -> Path:
        return self.meta_dir / (check_repo_path(f.path) + PART_SUFFIX)

    def lock_path(self, f: RemoteFile) -> Path:
        return self.meta_dir / (check_repo_path(f.path) + ".lock")

    def _meta_path(self, f: RemoteFile) -> Path:
        return self.meta_dir / (check_repo_path(f.path) + ".json")

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
        if digest_file(final, f.digest, f.size) != f.oid:
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
        st = self.visible_path(commit, f).stat()
        _write_atomic(
            self._meta_path(f),
            json.dumps({"oid": f.oid, "size": f.size, "commit": commit, "mtime_ns": st.st_mtime_ns}),
        )

    def place(self, commit: str, files: list[RemoteFile], part: Path) -> None:
        (f,) = files  # one part file per path here
        final = self.visible_path(commit, f)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        fsync_dir(final.parent)
        self._write_meta(commit, f)

    def finalize(self, revision: str | None, commit: str, files: list[RemoteFile]) -> None:
        pass
