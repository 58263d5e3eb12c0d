"""Where pulled files go: the standard Hugging Face cache layout, or a plain local directory.

Cache layout (the one huggingface_hub, transformers and vLLM read, offline included)::

    $HF_HUB_CACHE/models--ns--name/
        blobs/<sha256 or git-sha1>          the bytes, named by content
        snapshots/<commit>/<path>           relative symlinks into blobs/
        refs/<branch or tag>                the commit a name pointed to when pulled
    $HF_HUB_CACHE/.locks/models--ns--name/  lock files

Part files (``*.qtk-part`` + ``.state.json``) live beside their final place, so the final
``os.replace`` is an atomic rename on one filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import errors
from ._fetch import new_hasher

__all__ = ["RemoteFile", "CacheTarget", "LocalDirTarget", "check_safe_path", "repo_folder_name", "is_commit_sha"]

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
PART_SUFFIX = ".qtk-part"


def is_commit_sha(revision: str | None) -> bool:
    return bool(revision and _SHA_RE.match(revision))


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


def check_safe_path(path: str) -> None:
    """Refuse remote names that could escape the destination directory."""
    p = PurePosixPath(path)
    if (
        not path
        or p.is_absolute()
        or path.startswith(("/", "\\"))
        or ".." in p.parts
        or "\\" in path
        or "\x00" in path
        or re.match(r"^[A-Za-z]:", path)
    ):
        raise errors.UnsafePathError(
            f"Refusing the remote file name {path!r}: it is absolute or contains '..'.",
            hint="The endpoint listed an unsafe path; nothing was written. Report it to the repo owner.",
        )


def _relative_symlink(target: Path, link: Path) -> None:
    """Create (or atomically replace) ``link`` -> ``target`` as a relative symlink."""
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    with contextlib.suppress(OSError):
        if os.readlink(link) == rel:
            return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp-link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CacheTarget:
    """The standard HF cache layout under ``hub_cache``."""

    kind = "cache"

    def __init__(self, hub_cache: Path, repo_id: str, repo_type: str = "model") -> None:
        self.hub_cache = Path(hub_cache)
        folder = repo_folder_name(repo_id, repo_type)
        self.repo_dir = self.hub_cache / folder
        self.locks_dir = self.hub_cache / ".locks" / folder

    def blob_path(self, f: RemoteFile) -> Path:
        return self.repo_dir / "blobs" / f.oid

    def visible_path(self, commit: str, f: RemoteFile) -> Path:
        return self.repo_dir / "snapshots" / commit / f.path

    def root(self, commit: str) -> Path:
        return self.repo_dir / "snapshots" / commit

    def part_path(self, f: RemoteFile) -> Path:
        return self.repo_dir / "blobs" / (f.oid + PART_SUFFIX)

    def lock_path(self, f: RemoteFile) -> Path:
        return self.locks_dir / f"{f.oid}.qtk.lock"

    def is_present(self, commit: str, f: RemoteFile) -> bool:
        # Blobs are only ever renamed into place after verification, so size is enough here.
        try:
            return self.blob_path(f).stat().st_size == f.size
        except FileNotFoundError:
            return False

    def place(self, commit: str, f: RemoteFile, part: Path) -> None:
        blob = self.blob_path(f)
        os.replace(part, blob)
        _relative_symlink(blob, self.visible_path(commit, f))

    def finalize(self, revision: str | None, commit: str, files: list[RemoteFile]) -> None:
        for f in files:
            _relative_symlink(self.blob_path(f), self.visible_path(commit, f))
        ref = revision or "main"
        if not is_commit_sha(ref):  # as huggingface_hub: names get a ref, shas do not
            _write_atomic(self.repo_dir / "refs" / ref, commit)

    # -- offline ---------------------------------------------------------------

    def resolve_offline(self, revision: str | None) -> str | None:
        ref = revision or "main"
        if is_commit_sha(ref):
            return ref if (self.repo_dir / "snapshots" / ref).is_dir() else None
        try:
            return (self.repo_dir / "refs" / ref).read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def cached_files(self, commit: str) -> list[RemoteFile]:
        """Files of a cached snapshot. The oid is the blob name the link points to."""
        snap = self.repo_dir / "snapshots" / commit
        out: list[RemoteFile] = []
        for p in sorted(snap.rglob("*")):
            if p.is_dir() or not p.exists():
                continue
            rel = p.relative_to(snap).as_posix()
            oid = Path(os.path.realpath(p)).name
            out.append(RemoteFile(rel, p.stat().st_size, oid, lfs=len(oid) == 64))
        return out


class LocalDirTarget:
    """Files placed at ``local_dir/<path>``; bookkeeping under ``local_dir/.cache/qtk``."""

    kind = "local_dir"

    def __init__(self, local_dir: Path) -> None:
        self.local_dir = Path(local_dir)
        self.meta_dir = self.local_dir / ".cache" / "qtk" / "download"
        self.locks_dir = self.meta_dir

    def visible_path(self, commit: str, f: RemoteFile) -> Path:
        return self.local_dir / f.path

    def root(self, commit: str) -> Path:
        return self.local_dir

    def part_path(self, f: RemoteFile) -> Path:
        return self.meta_dir / (f.path + PART_SUFFIX)

    def lock_path(self, f: RemoteFile) -> Path:
        return self.meta_dir / (f.path + ".lock")

    def _meta_path(self, f: RemoteFile) -> Path:
        return self.meta_dir / (f.path + ".json")

    def is_present(self, commit: str, f: RemoteFile) -> bool:
        final = self.local_dir / f.path
        try:
            st = final.stat()
        except FileNotFoundError:
            return False
        if st.st_size != f.size:
            return False
        try:
            meta = json.loads(self._meta_path(f).read_text())
            if meta.get("oid") == f.oid and meta.get("mtime_ns") == st.st_mtime_ns:
                return True
        except (FileNotFoundError, ValueError):
            pass
        # A file we did not place (or that was touched): adopt it only if its content matches.
        if _digest_file(final, f) == f.oid:
            self._write_meta(commit, f)
            return True
        return False

    def _write_meta(self, commit: str, f: RemoteFile) -> None:
        st = (self.local_dir / f.path).stat()
        _write_atomic(
            self._meta_path(f),
            json.dumps({"oid": f.oid, "size": f.size, "commit": commit, "mtime_ns": st.st_mtime_ns}),
        )

    def place(self, commit: str, f: RemoteFile, part: Path) -> None:
        final = self.local_dir / f.path
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        self._write_meta(commit, f)

    def finalize(self, revision: str | None, commit: str, files: list[RemoteFile]) -> None:
        pass


def _digest_file(path: Path, f: RemoteFile) -> str:
    h = new_hasher(f.digest, f.size)
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()
