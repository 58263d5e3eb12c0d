"""What ``qtk serve DIR`` serves: repos found in DIR, in three layouts.

* plain folders: ``DIR/<ns>/<name>/...`` (models) and ``DIR/datasets/<ns>/<name>/...``. One revision,
  ``main``, whose commit sha is derived from the file names and contents (it changes when they do).
* a provision store (``DIR/<ns>/<name>`` is a symlink into the directory of published versions of a
  :class:`PublishedVersions` passed in, ``qtk provision``'s store: ``qtk serve`` builds it): ``main`` is
  the published version, and every version the publisher keeps (the previous one, for nodes
  mid-download) stays reachable under its own commit sha. The mirror never imports the publisher.
* a Hugging Face cache: ``DIR/models--ns--name/{blobs,snapshots,refs}`` (e.g. ``$HF_HUB_CACHE``): every
  cached snapshot is a revision, ``refs/`` give the branch and tag names.

Safety rules (the request parser has already refused malformed names; the store decides what exists):

* a request's file path is only ever a key into a listing built here; it is never joined onto a path;
* every listed file's real path (symlinks resolved) lies inside its repo's real directory (for the
  cache layout: the ``models--ns--name`` folder, where ``blobs/`` live);
* names starting with a dot (``.git``, ``.cache``, ``.qtk-provision``, ``.qtk-serve`` ...) are never
  listed at any depth, nor is the access file (matched by inode, wherever it lives);
* dangling symlinks, FIFOs, sockets and devices are skipped and logged once; they never stop the rest
  of the repo from being served, and nothing is opened to find out what it is (``stat`` first);
* repo ids are case-insensitive, as on the Hub: a request in any case maps to the one directory whose
  name matches case-insensitively, and answers with that canonical spelling. Two directories that differ
  only in case (``Acme/X`` and ``acme/x``) make that id ambiguous: neither is served (logged).

Hashes come from :class:`~qtk.mirror.hashindex.HashIndex` (persistent, keyed on the real file's
dev/inode/size/mtime/ctime); in the cache layout the blob name already is the hash. Listings are cached
and revalidated at most every ``listing_ttl`` seconds by ``stat`` (directories and files, no hashing
unless something changed; repos with more than ``BACKGROUND_REVALIDATE`` paths off the request path, and
never more often than 20x what the last pass cost, so even a million-file repo costs ~5% of a core); a
resolve re-checks its one file, so a changed file is never served with an old hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat as stat_mod
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

from ..hub.names import (REPO_PATH_MAX, RESERVED_NAMESPACES, is_commit_sha, is_hidden_part, is_ref_name, is_repo_id,
                         is_served_part)
from .hashindex import FileKey, HashIndex, file_key

__all__ = ["MirrorStore", "PublishedVersions", "RepoEntry", "RepoRevision", "StoredFile", "LFS_MIN_SIZE",
           "git_blob_sha1", "is_lfs_name", "lfs_pointer"]

log = logging.getLogger("qtk.mirror")

LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub's default threshold for LFS
_LFS_SUFFIXES = {
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".onnx", ".h5", ".msgpack",
    ".parquet", ".arrow", ".npy", ".npz", ".pkl", ".model", ".tflite", ".zip", ".gz", ".tar", ".zst",
}
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
BACKGROUND_REVALIDATE = 2000  # listings watching more paths than this are re-stat'ed off the request path


def is_lfs_name(path: str, size: int) -> bool:
    return size >= LFS_MIN_SIZE or os.path.splitext(path)[1].lower() in _LFS_SUFFIXES


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class PublishedVersions(Protocol):
    """A publisher's view of the repos it manages in the served directory, passed into the mirror
    (:class:`qtk.provision.store.ProvisionStore` implements it; ``qtk serve`` passes one in). A repo
    folder that is a symlink to a directory directly below :attr:`versions_root` is managed: the mirror
    serves its current target as ``main`` and each of :meth:`kept_versions` under its own commit."""

    @property
    def versions_root(self) -> Path:
        """The directory holding every published version, one directory each."""
        ...

    def kept_versions(self, repo_id: str) -> list[Path]:
        """The version directories still served for ``repo_id``, the current one first (the publisher's
        policy: the mirror serves what this returns, confined to :attr:`versions_root`)."""
        ...


@dataclass(frozen=True)
class StoredFile:
    path: str  # in the repo, posix
    abspath: str  # the real path (symlinks resolved), inside the repo's real directory
    size: int
    lfs: bool
    sha256: str | None  # LFS files
    sha1: str  # git blob sha1 of the content (non-LFS) or of the LFS pointer (LFS)
    key: FileKey | None = None  # (dev, ino, size, mtime_ns, ctime_ns) when listed: what may be served
    mtime: float = 0.0

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


@dataclass(frozen=True)
class RepoEntry:
    """A repo found on disk. ``repo_id`` is spelled as on disk (the canonical id)."""

    repo_type: str
    repo_id: str
    layout: str  # "plain" | "cache"
    path: Path  # as found under the root (may be a symlink: provision, or the admin's choice)

    @property
    def key(self) -> str:
        """The access-policy key: ``ns/name`` for models, ``datasets/ns/name`` for datasets."""
        return self.repo_id if self.repo_type == "model" else f"datasets/{self.repo_id}"


@dataclass
class _Listing:
    rev: RepoRevision
    watched: dict[str, int]  # real dir or file path -> mtime_ns (dirs) / ctime_ns (files)
    checked: float = field(default_factory=time.monotonic)
    interval: float = 0.0  # seconds between revalidations: the TTL, or 20x what the last one cost if more


@dataclass
class IndexStats:
    repos: int = 0
    files: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    skipped: int = 0
    dropped: int = 0  # index rows of file versions no longer in the store


class MirrorStore:
    def __init__(self, root: str | Path, *, index: HashIndex | None = None, exclude: Iterable[str | Path] = (),
                 listing_ttl: float = 2.0, catalog_ttl: float = 2.0, versions: PublishedVersions | None = None) -> None:
        """``versions``: the publisher managing repos in ``root`` (a provision store), or None: every repo
        folder serves its one current directory."""
        self.root = Path(root)
        self.versions = versions
        self.index = index if index is not None else HashIndex(None)
        self.listing_ttl, self.catalog_ttl = listing_ttl, catalog_ttl
        self._excluded: set[tuple[int, int]] = set()
        self._mu = threading.Lock()
        self._catalog: dict[tuple[str, str], RepoEntry | None] = {}
        self._catalog_at = -1e9
        self._listings: dict[str, _Listing] = {}
        self._building: dict[str, threading.Lock] = {}
        self._warned: set[str] = set()
        for p in exclude:
            self.exclude_file(p)

    def exclude_file(self, path: str | Path) -> None:
        """Never list or serve this file (the access file), under any name or link."""
        try:
            st = os.stat(path)
        except OSError:
            return
        with self._mu:
            self._excluded.add((st.st_dev, st.st_ino))
            for v in self._listings.values():
                v.checked, v.watched = -1e9, {"": -1}

    def warn_once(self, message: str) -> None:
        with self._mu:
            if message in self._warned:
                return
            self._warned.add(message)
        log.warning("%s", message)

    # -- the catalog: which repos exist, under which canonical spelling ------------------------------

    def _scan_catalog(self) -> dict[tuple[str, str], RepoEntry | None]:
        found: list[RepoEntry] = []
        for e in _scandir(self.root):
            name = e.name
            if is_hidden_part(name) or not _is_dir(e):
                continue
            if "--" in name:
                kind, _, rest = name.partition("--")
                rid = rest.replace("--", "/")
                if kind in ("models", "datasets") and rid.count("/") == 1 and is_repo_id(rid) \
                        and os.path.isdir(os.path.join(e.path, "snapshots")):
                    found.append(RepoEntry(kind[:-1], rid, "cache", Path(e.path)))
                continue
            if name == "datasets":
                for ns in _scandir(e.path):
                    found += self._plain_repos("dataset", ns)
            elif name.lower() not in RESERVED_NAMESPACES:  # namespaces are case-insensitive (qtk.hub.names)
                found += self._plain_repos("model", e)
        catalog: dict[tuple[str, str], RepoEntry | None] = {}
        for entry in found:
            k = (entry.repo_type, entry.repo_id.lower())
            old = catalog.get(k, entry)
            if old is None or (old.repo_id != entry.repo_id):
                catalog[k] = None
                self.warn_once(f"{entry.repo_type} {entry.repo_id!r} differs only in case from another repo in "
                               f"{self.root}: neither is served (rename one).")
            elif old.layout == "cache" and entry.layout == "plain":
                continue  # both layouts for one id: the cache (with its revisions) wins
            else:
                catalog[k] = entry
        return catalog

    def _plain_repos(self, repo_type: str, ns: os.DirEntry) -> list[RepoEntry]:
        if is_hidden_part(ns.name) or "--" in ns.name or not _is_dir(ns):
            return []
        out = []
        for e in _scandir(ns.path):
            rid = f"{ns.name}/{e.name}"
            if is_hidden_part(e.name):
                continue
            if not is_repo_id(rid):
                self.warn_once(f"Skipping {e.path}: {rid!r} is not a valid repo id.")
                continue
            if _is_dir(e):
                out.append(RepoEntry(repo_type, rid, "plain", Path(e.path)))
        return out

    def catalog(self) -> dict[tuple[str, str], RepoEntry | None]:
        now = time.monotonic()
        with self._mu:
            fresh = now - self._catalog_at < self.catalog_ttl
            if fresh:
                return self._catalog
        cat = self._scan_catalog()
        with self._mu:
            self._catalog, self._catalog_at = cat, now
        return cat

    def find(self, repo_type: str, repo_id: str) -> RepoEntry | None:
        """The repo for an id in any case, or None (absent, invalid or ambiguous)."""
        if not is_repo_id(repo_id):
            return None
        k = (repo_type, repo_id.lower())
        entry = self.catalog().get(k)
        if entry is None and k not in self._catalog and time.monotonic() - self._catalog_at > 0.2:
            with self._mu:
                self._catalog_at = -1e9  # a repo created a moment ago: look again (rate-limited)
            entry = self.catalog().get(k)
        return entry

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return self.find(repo_type, repo_id) is not None

    def list_repos(self) -> list[tuple[str, str]]:
        """(repo_type, canonical repo_id) of every servable repo."""
        return sorted((e.repo_type, e.repo_id) for e in self.catalog().values() if e is not None)

    # -- revisions ----------------------------------------------------------------------------------

    def revision(self, repo_type: str, repo_id: str, revision: str | None) -> RepoRevision | None:
        """The repo at ``revision`` (branch, tag or full commit sha); None if repo or revision is unknown."""
        entry = self.find(repo_type, repo_id)
        return self.revision_of(entry, revision or "main") if entry else None

    def revision_of(self, entry: RepoEntry, rev: str) -> RepoRevision | None:
        if not is_ref_name(rev):
            return None
        if entry.layout == "cache":
            return self._cache_revision(entry, rev)
        versions = self._versions(entry)
        if not versions:
            return None
        if rev == "main":
            return self._listing(entry, versions[0])
        if is_commit_sha(rev):
            for v in versions:
                snap = self._listing(entry, v)
                if snap is not None and snap.commit == rev:
                    return snap
        return None

    def _versions(self, entry: RepoEntry) -> list[str]:
        """Real directories serving this plain repo: the current one first, then any kept older one."""
        try:
            current = os.path.realpath(entry.path)
        except OSError:
            return []
        if self.versions is None or not entry.path.is_symlink():
            return [current]
        published = os.path.realpath(self.versions.versions_root)
        if not _inside(current, published) or current == published:
            return [current]
        out = [current]
        for p in self.versions.kept_versions(entry.repo_id):
            real = os.path.realpath(p)
            if real not in out and _inside(real, published) and real != published:
                out.append(real)
        return out

    def _cache_revision(self, entry: RepoEntry, rev: str) -> RepoRevision | None:
        cache = os.path.realpath(entry.path)
        snapshots = os.path.join(cache, "snapshots")
        commit = None
        if is_commit_sha(rev) and os.path.isdir(os.path.join(snapshots, rev)):
            commit = rev
        else:
            ref = os.path.join(cache, "refs", *rev.split("/"))
            if _inside(os.path.realpath(ref), os.path.join(cache, "refs")) and os.path.isfile(ref):
                try:
                    with open(ref, encoding="ascii", errors="replace") as fh:
                        commit = fh.read(100).strip()
                except OSError:
                    return None
        if not is_commit_sha(commit) or not os.path.isdir(os.path.join(snapshots, commit)):
            return None
        snap = os.path.realpath(os.path.join(snapshots, commit))
        if not _inside(snap, snapshots):
            return None
        return self._listing(entry, snap, allowed=cache, commit=commit)

    # -- listings -----------------------------------------------------------------------------------

    def _listing(self, entry: RepoEntry, top: str, *, allowed: str | None = None,
                 commit: str | None = None, walked=None) -> RepoRevision | None:
        cache_key = f"{entry.repo_type}\0{entry.repo_id}\0{top}"
        now = time.monotonic()
        with self._mu:
            cur = self._listings.get(cache_key)
            lock = self._building.setdefault(cache_key, threading.Lock())
        if cur is not None and now - cur.checked < max(self.listing_ttl, cur.interval):
            return cur.rev
        invalidated = cur is not None and "" in cur.watched
        if cur is not None and not invalidated:
            if not lock.acquire(blocking=False):
                return cur.rev  # another thread is revalidating it; a resolve still checks its own file
            if len(cur.watched) > BACKGROUND_REVALIDATE:  # big repo: stat it off the request path
                threading.Thread(target=self._refresh_in_background, name="qtk-mirror-revalidate", daemon=True,
                                 args=(lock, cache_key, entry, top, allowed, commit)).start()
                return cur.rev
        else:
            lock.acquire()  # one build per listing at a time; the others wait and reuse it
        try:
            return self._refresh(cache_key, entry, top, allowed, commit, walked)
        finally:
            lock.release()

    def _refresh_in_background(self, lock, *args) -> None:
        try:
            self._refresh(*args)
        except Exception:  # noqa: BLE001 - the next request tries again
            log.exception("revalidating a listing failed")
        finally:
            lock.release()

    def _refresh(self, cache_key: str, entry: RepoEntry, top: str, allowed: str | None, commit: str | None,
                 walked=None) -> RepoRevision | None:
        with self._mu:
            cur = self._listings.get(cache_key)
        if cur is not None and time.monotonic() - cur.checked < max(self.listing_ttl, cur.interval):
            return cur.rev
        t0 = time.monotonic()
        if cur is not None and _unchanged(cur.watched):
            cur.checked = time.monotonic()
            cur.interval = 20 * (cur.checked - t0)  # revalidating costs at most ~5% of a core
            return cur.rev
        built = self._build(entry, top, allowed or top, commit, walked)
        with self._mu:
            if built is None:
                self._listings.pop(cache_key, None)
            else:
                self._listings[cache_key] = built
        return built.rev if built else None

    def invalidate(self, snap: RepoRevision | None = None) -> None:
        """Forget cached listings (of one repo, or all): the next request re-stats and re-lists."""
        with self._mu:
            for k, v in list(self._listings.items()):
                if snap is None or (v.rev.repo_type, v.rev.repo_id) == (snap.repo_type, snap.repo_id):
                    v.checked = -1e9
                    v.watched = {"": -1}

    def _build(self, entry: RepoEntry, top: str, allowed: str, commit: str | None, walked=None) -> _Listing | None:
        walked = walked or self.walk(entry, top, allowed)
        if walked is None:
            return None
        found, watched = walked
        files: dict[str, StoredFile] = {}
        latest = 0.0
        for rel, (real, st) in found.items():
            f = self._stored(rel, real, st, trust_blob=entry.layout == "cache", blobs=os.path.join(allowed, "blobs"))
            if f is None:
                continue
            files[rel] = f
            latest = max(latest, st.st_mtime)
        if commit is None:
            manifest = "\n".join(f"{p}\0{files[p].etag}" for p in sorted(files)).encode()
            commit = hashlib.sha1(b"qtk-mirror\0" + manifest).hexdigest()
        return _Listing(RepoRevision(entry.repo_id, entry.repo_type, commit, files, latest), watched)

    def walk(self, entry: RepoEntry, top: str, allowed: str):
        """Files of a repo version: {path: (real path, stat)} and the watched stamps; None if ``top`` is
        not a readable directory. Applies every rule of the module docstring."""
        found: dict[str, tuple[str, os.stat_result]] = {}
        watched: dict[str, int] = {}
        seen: set[tuple[int, int]] = set()
        stack = [("", top)]
        label = f"{entry.repo_type} {entry.repo_id}"
        while stack:
            rel_dir, real_dir = stack.pop()
            try:
                dst = os.stat(real_dir)
                it = os.scandir(real_dir)
            except OSError as exc:
                if not rel_dir:
                    return None
                self.warn_once(f"{label}: skipping unreadable directory {rel_dir!r} ({exc.strerror}).")
                continue
            if (dst.st_dev, dst.st_ino) in seen:
                continue  # a symlink loop
            seen.add((dst.st_dev, dst.st_ino))
            watched[real_dir] = dst.st_mtime_ns
            with it:
                for e in it:
                    self._visit(e, rel_dir, allowed, label, found, stack)
        for real, st in found.values():
            watched[real] = st.st_ctime_ns
        return found, watched

    def _visit(self, e: os.DirEntry, rel_dir: str, allowed: str, label: str, found: dict, stack: list) -> None:
        name = e.name
        if is_hidden_part(name):
            return
        rel = f"{rel_dir}/{name}" if rel_dir else name
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # (is_served_part refuses it too; such a name cannot be logged)
            self.warn_once(f"{label}: skipping {rel_dir or '.'}/<a name that is not UTF-8>.")
            return
        if len(rel) > REPO_PATH_MAX or not is_served_part(name):
            self.warn_once(f"{label}: skipping {rel!r}: not a valid repo path.")
            return
        try:
            if e.is_symlink():
                real = os.path.realpath(e.path)
                if not _inside(real, allowed):
                    self.warn_once(f"{label}: skipping {rel!r}: symlink points outside the repo.")
                    return
                st = os.stat(real)
            else:
                real, st = e.path, e.stat(follow_symlinks=False)
        except OSError:
            self.warn_once(f"{label}: skipping {rel!r}: dangling symlink or unreadable.")
            return
        if stat_mod.S_ISDIR(st.st_mode):
            stack.append((rel, real))
        elif not stat_mod.S_ISREG(st.st_mode):
            self.warn_once(f"{label}: skipping {rel!r}: not a regular file (FIFO, socket or device).")
        elif (st.st_dev, st.st_ino) in self._excluded:
            self.warn_once(f"{label}: skipping {rel!r}: it is the access file.")
        else:
            found[rel] = (real, st)

    def _stored(self, rel: str, real: str, st: os.stat_result, *, trust_blob: bool, blobs: str,
                progress: Callable[[int], None] | None = None) -> StoredFile | None:
        key = file_key(st)
        blob = os.path.basename(real)
        if trust_blob and os.path.dirname(real) == blobs:
            if _SHA256_RE.match(blob):
                return StoredFile(rel, real, st.st_size, True, blob,
                                  git_blob_sha1(lfs_pointer(blob, st.st_size)), key, st.st_mtime)
            if _SHA1_RE.match(blob):
                return StoredFile(rel, real, st.st_size, False, None, blob, key, st.st_mtime)
        lfs = is_lfs_name(rel, st.st_size)
        try:
            sha256, sha1 = self.index.hashes(real, key, need_sha1=not lfs, progress=progress)
        except OSError as exc:
            self.warn_once(f"skipping {real}: cannot hash it ({exc}).")
            return None
        if lfs:
            return StoredFile(rel, real, st.st_size, True, sha256, git_blob_sha1(lfs_pointer(sha256, st.st_size)),
                              key, st.st_mtime)
        return StoredFile(rel, real, st.st_size, False, None, sha1 or "", key, st.st_mtime)

    def current(self, f: StoredFile) -> bool:
        """Is ``f`` still exactly the file that was listed (same inode, size, mtime and ctime)?"""
        try:
            return f.key is None or file_key(os.stat(f.abspath)) == f.key
        except OSError:
            return False

    # -- indexing ahead of requests -------------------------------------------------------------------

    def index_all(self, *, on_total: Callable[[int, int], None] | None = None,
                  progress: Callable[[int], None] | None = None) -> IndexStats:
        """Hash every file not yet in the index (``on_total(files, bytes)`` first, then ``progress(n)``
        per chunk hashed), then build and cache every listing: after this, requests never hash."""
        stats = IndexStats()
        work: list[tuple[str, str, os.stat_result, bool]] = []
        tops = []
        for entry in (e for e in self.catalog().values() if e is not None):
            stats.repos += 1
            for top, allowed in self._tops(entry):
                walked = self.walk(entry, top, allowed)
                tops.append((entry, top, allowed, walked))
                for rel, (real, st) in (walked[0].items() if walked else ()):
                    stats.files += 1
                    trusted = entry.layout == "cache" and os.path.dirname(real) == os.path.join(allowed, "blobs") \
                        and (_SHA256_RE.match(os.path.basename(real)) or _SHA1_RE.match(os.path.basename(real)))
                    lfs = is_lfs_name(rel, st.st_size)
                    hit = self.index.get(file_key(st))
                    if not trusted and (hit is None or (hit[1] is None and not lfs)):
                        work.append((rel, real, st, lfs))
        live = {file_key(st) for _e, _t, _a, walked in tops if walked for _r, st in walked[0].values()}
        stats.dropped = self.index.retain(live)  # hashes of files replaced or deleted since: forgotten
        unique = {file_key(st): (rel, real, st, lfs) for rel, real, st, lfs in work}
        if on_total:
            on_total(len(unique), sum(st.st_size for _r, _p, st, _l in unique.values()))
        for key, (rel, real, st, lfs) in unique.items():
            try:
                self.index.hashes(real, key, need_sha1=not lfs, progress=progress)
                stats.hashed_files += 1
                stats.hashed_bytes += st.st_size
            except OSError as exc:
                stats.skipped += 1
                self.warn_once(f"skipping {real}: cannot hash it ({exc}).")
        for entry, top, allowed, walked in tops:
            commit = os.path.basename(top) if entry.layout == "cache" else None
            self._listing(entry, top, allowed=allowed, commit=commit, walked=walked)
        return stats

    def _tops(self, entry: RepoEntry) -> list[tuple[str, str]]:
        """(directory to list, directory files must resolve into) for every revision of a repo."""
        if entry.layout != "cache":
            return [(v, v) for v in self._versions(entry)]
        cache = os.path.realpath(entry.path)
        snaps = os.path.join(cache, "snapshots")
        return [(os.path.realpath(e.path), cache) for e in _scandir(snaps)
                if is_commit_sha(e.name) and _is_dir(e) and _inside(os.path.realpath(e.path), snaps)]


def _scandir(path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _unchanged(watched: dict[str, int]) -> bool:
    """True if every watched directory (mtime) and file (ctime) still has its stamp."""
    for path, stamp in watched.items():
        try:
            st = os.stat(path)
        except OSError:
            return False
        if stamp != (st.st_mtime_ns if stat_mod.S_ISDIR(st.st_mode) else st.st_ctime_ns):
            return False
    return True
