"""What ``qtk serve DIR`` serves: repos found in DIR, in either of two layouts.

* plain folders: ``DIR/<ns>/<name>/...`` (models) and ``DIR/datasets/<ns>/<name>/...``. One revision,
  ``main``, whose commit sha is derived from the file names and contents (it changes when they do).
* a Hugging Face cache: ``DIR/models--ns--name/{blobs,snapshots,refs}`` (e.g. ``$HF_HUB_CACHE``): every
  cached snapshot is a revision, ``refs/`` give the branch and tag names.

Hashes (sha256 for LFS files, git blob sha1 for the others) are computed once per file version
(path, size, mtime) and kept in memory; in the cache layout the blob name already is the hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MirrorStore", "RepoRevision", "StoredFile", "LFS_MIN_SIZE"]

LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub's default threshold for LFS
_LFS_SUFFIXES = {
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".onnx", ".h5", ".msgpack",
    ".parquet", ".arrow", ".npy", ".npz", ".pkl", ".model", ".tflite", ".zip", ".gz", ".tar", ".zst",
}
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SKIP_DIRS = {".git", ".cache", ".qtk-mirror"}


def is_lfs_name(path: str, size: int) -> bool:
    return size >= LFS_MIN_SIZE or Path(path).suffix.lower() in _LFS_SUFFIXES


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    path: str  # in the repo, posix
    abspath: Path
    size: int
    lfs: bool
    sha256: str | None  # LFS files
    sha1: str  # git blob sha1 of the content (non-LFS) or of the LFS pointer (LFS)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs and self.sha256 else self.sha1

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.sha1, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return entry


@dataclass(frozen=True)
class RepoRevision:
    repo_id: str
    repo_type: str
    commit: str
    files: dict[str, StoredFile]
    last_modified: float


class MirrorStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._hashes: dict[tuple[str, int, int], tuple[str, str | None]] = {}
        self._mu = threading.Lock()

    # -- lookup -----------------------------------------------------------------

    def _plain_dir(self, repo_type: str, repo_id: str) -> Path:
        base = self.root / "datasets" if repo_type == "dataset" else self.root
        return base.joinpath(*repo_id.split("/"))

    def _cache_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "--".join([f"{repo_type}s", *repo_id.split("/")])

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return self._cache_dir(repo_type, repo_id).is_dir() or self._plain_dir(repo_type, repo_id).is_dir()

    def revision(self, repo_type: str, repo_id: str, revision: str | None) -> RepoRevision | None:
        """The repo at ``revision`` (branch, tag or full commit sha); None if the revision is unknown.

        Call :meth:`exists` first to tell an unknown repo from an unknown revision.
        """
        rev = revision or "main"
        cache = self._cache_dir(repo_type, repo_id)
        if cache.is_dir():
            return self._cache_revision(cache, repo_type, repo_id, rev)
        plain = self._plain_dir(repo_type, repo_id)
        if plain.is_dir():
            snap = self._scan_plain(plain, repo_type, repo_id)
            return snap if rev in ("main", snap.commit) else None
        return None

    def list_repos(self) -> list[tuple[str, str]]:
        """(repo_type, repo_id) of every repo in the store."""
        out: set[tuple[str, str]] = set()
        if not self.root.is_dir():
            return []
        for p in self.root.iterdir():
            if p.is_dir() and "--" in p.name and (p / "snapshots").is_dir():
                kind, _, rest = p.name.partition("--")
                out.add((kind.rstrip("s"), rest.replace("--", "/")))
        for repo_type, base in (("model", self.root), ("dataset", self.root / "datasets")):
            if not base.is_dir():
                continue
            for ns in base.iterdir():
                if not ns.is_dir() or ns.name.startswith(".") or "--" in ns.name or ns == self.root / "datasets":
                    continue
                for name in ns.iterdir():
                    if name.is_dir() and not name.name.startswith("."):
                        out.add((repo_type, f"{ns.name}/{name.name}"))
        return sorted(out)

    # -- the two layouts ----------------------------------------------------------

    def _cache_revision(self, cache: Path, repo_type: str, repo_id: str, rev: str) -> RepoRevision | None:
        commit = None
        if _SHA1_RE.match(rev) and (cache / "snapshots" / rev).is_dir():
            commit = rev
        else:
            ref = cache / "refs" / rev
            if ref.is_file():
                commit = ref.read_text().strip()
        if not commit or not (cache / "snapshots" / commit).is_dir():
            return None
        snap = cache / "snapshots" / commit
        files: dict[str, StoredFile] = {}
        latest = 0.0
        for p in sorted(snap.rglob("*")):
            if p.is_dir() or not p.exists():
                continue
            rel = p.relative_to(snap).as_posix()
            real = Path(os.path.realpath(p))
            st = real.stat()
            latest = max(latest, st.st_mtime)
            blob = real.name
            if _SHA256_RE.match(blob):
                files[rel] = StoredFile(rel, real, st.st_size, True, blob, git_blob_sha1(lfs_pointer(blob, st.st_size)))
            elif _SHA1_RE.match(blob):
                files[rel] = StoredFile(rel, real, st.st_size, False, None, blob)
            else:
                files[rel] = self._hashed(rel, real, st)
        return RepoRevision(repo_id, repo_type, commit, files, latest)

    def _scan_plain(self, folder: Path, repo_type: str, repo_id: str) -> RepoRevision:
        files: dict[str, StoredFile] = {}
        latest = 0.0
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(filenames):
                p = Path(dirpath) / name
                rel = p.relative_to(folder).as_posix()
                st = p.stat()
                latest = max(latest, st.st_mtime)
                files[rel] = self._hashed(rel, p, st)
        manifest = "\n".join(f"{f.path}\0{f.etag}" for f in files.values()).encode()
        commit = hashlib.sha1(b"qtk-mirror\0" + manifest).hexdigest()
        return RepoRevision(repo_id, repo_type, commit, files, latest)

    def _hashed(self, rel: str, path: Path, st: os.stat_result) -> StoredFile:
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._mu:
            cached = self._hashes.get(key)
        lfs = is_lfs_name(rel, st.st_size)
        if cached is None:
            sha256 = hashlib.sha256()
            sha1 = hashlib.sha1(b"blob %d\0" % st.st_size)
            with open(path, "rb") as fh:
                while chunk := fh.read(4 * 1024 * 1024):
                    sha256.update(chunk)
                    if not lfs:
                        sha1.update(chunk)
            cached = (sha1.hexdigest(), sha256.hexdigest())
            with self._mu:
                self._hashes[key] = cached
        sha1_hex, sha256_hex = cached
        if lfs:
            return StoredFile(rel, path, st.st_size, True, sha256_hex, git_blob_sha1(lfs_pointer(sha256_hex, st.st_size)))
        return StoredFile(rel, path, st.st_size, False, None, sha1_hex)
