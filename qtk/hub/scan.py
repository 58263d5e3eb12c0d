"""The HF cache as a whole: list it, re-hash it, prune it (``qtk cache ls / verify / prune``).

The standard layout is read with huggingface_hub's own ``scan_cache_dir`` (so qtk and ``hf cache``
agree on repos, revisions and sizes); qtk adds what it knows on top: its resumable ``*.qtk-part``
downloads (and huggingface_hub's ``*.incomplete`` ones), its verified records, its lock files.

Nothing here deletes a file another process may be using: a partial download or an unreferenced blob
is removed only while prune itself holds its lock (taken without waiting: one held by a pull, or by a
process on another host that this host cannot prove dead, keeps it), and nothing younger than a grace
period goes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import errors
from .._proc import Owner
from ._fetch import resumable_bytes
from ._lock import EXCL_SUFFIX, Locker, holder_info, is_locked
from .cache import MARKER_DIR, PART_SUFFIX, CacheTarget, RemoteFile, digest_file
from .names import is_oid

__all__ = ["PartialDownload", "CachedRevision", "CachedRepo", "CacheListing", "BlobCheck", "VerifyReport",
           "PruneAction", "list_cache", "verify_cache", "prune_cache", "parse_duration"]

GRACE_S = 3600.0  # unreferenced blobs, stale locks and hf's abandoned partials younger than this are kept
STATE_SUFFIX = ".state.json"


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not m:
        raise errors.UsageError(f"Invalid duration {text!r}.", hint="Use a number with s, m, h, d or w, e.g. 7d or 12h.")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


@dataclass(frozen=True)
class PartialDownload:
    repo_id: str
    repo_type: str
    path: Path  # the part file
    oid: str
    size: int  # final size of the file
    resumable_bytes: int  # what a re-run of the pull keeps
    kind: str  # "qtk" (resumable) or "hf" (huggingface_hub's *.incomplete: not resumable across runs)
    in_use: bool  # a process holds its lock right now
    age_s: float  # since the last write

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass(frozen=True)
class CachedRevision:
    commit: str
    refs: tuple[str, ...]
    nb_files: int
    size_on_disk: int
    snapshot_path: Path

    def to_dict(self) -> dict:
        return {"commit": self.commit, "refs": list(self.refs), "nb_files": self.nb_files,
                "size_on_disk": self.size_on_disk, "snapshot_path": str(self.snapshot_path)}


@dataclass(frozen=True)
class CachedRepo:
    repo_id: str
    repo_type: str
    repo_path: Path
    size_on_disk: int
    nb_blobs: int
    last_modified: float
    revisions: tuple[CachedRevision, ...]
    partials: tuple[PartialDownload, ...] = ()

    def to_dict(self) -> dict:
        return {"repo_id": self.repo_id, "repo_type": self.repo_type, "repo_path": str(self.repo_path),
                "size_on_disk": self.size_on_disk, "nb_blobs": self.nb_blobs, "last_modified": self.last_modified,
                "revisions": [r.to_dict() for r in self.revisions], "partials": [p.to_dict() for p in self.partials]}


@dataclass(frozen=True)
class CacheListing:
    cache_dir: Path
    repos: tuple[CachedRepo, ...]
    partials: tuple[PartialDownload, ...]
    warnings: tuple[str, ...]

    @property
    def size_on_disk(self) -> int:
        return sum(r.size_on_disk for r in self.repos)

    def to_dict(self) -> dict:
        return {"cache_dir": str(self.cache_dir), "size_on_disk": self.size_on_disk,
                "repos": [r.to_dict() for r in self.repos], "partials": [p.to_dict() for p in self.partials],
                "partial_bytes_resumable": sum(p.resumable_bytes for p in self.partials),
                "warnings": list(self.warnings)}


def _repo_of(folder: str) -> tuple[str, str] | None:
    kind, _, rest = folder.partition("--")
    types = {"models": "model", "datasets": "dataset", "spaces": "space"}
    if kind not in types or not rest:
        return None
    return types[kind], rest.replace("--", "/")


def _lock_base(cache_dir: Path, folder: str, oid: str) -> Path:
    return cache_dir / ".locks" / folder / f"{oid}.qtk.lock"


def _partials(cache_dir: Path) -> list[PartialDownload]:
    out = []
    now = time.time()
    for suffix, kind in ((PART_SUFFIX, "qtk"), (".incomplete", "hf")):
        for part in sorted(cache_dir.glob(f"*/blobs/*{suffix}")):
            repo = _repo_of(part.parent.parent.name)
            oid = part.name[: -len(suffix)]
            try:
                st = part.stat()
            except OSError:
                continue
            if repo is None:
                continue
            size, resumable, in_use = st.st_size, 0, False
            if kind == "qtk":
                in_use = is_locked(_lock_base(cache_dir, part.parent.parent.name, oid))
                try:  # a state file is outside input too (another host, an older qtk, a torn write)
                    state = json.loads(part.with_name(part.name + STATE_SUFFIX).read_bytes())
                    size = int(state["size"])
                    resumable = resumable_bytes(part, size, tuple(state["digest"]))
                except (OSError, ValueError, KeyError, TypeError, OverflowError, AttributeError):
                    size, resumable = st.st_size, 0
            else:  # huggingface_hub holds its own filelock on .locks/<folder>/<oid>.lock while it writes
                in_use = is_locked(cache_dir / ".locks" / part.parent.parent.name / f"{oid}.lock")
            out.append(PartialDownload(repo[1], repo[0], part, oid, size, resumable, kind, in_use,
                                       max(0.0, now - st.st_mtime)))
    return out


def list_cache(cache_dir: Path, repo_ids: tuple[str, ...] = ()) -> CacheListing:
    """Repos, revisions, sizes (huggingface_hub's view) and partial downloads (qtk's and hf's)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache_dir = Path(cache_dir)
    try:
        info = scan_cache_dir(cache_dir)
        hf_repos, warnings = info.repos, tuple(str(w) for w in info.warnings)
    except CacheNotFound:
        hf_repos, warnings = frozenset(), ()
    partials = [p for p in _partials(cache_dir) if not repo_ids or p.repo_id in repo_ids]
    repos = []
    for r in sorted(hf_repos, key=lambda r: (r.repo_type, r.repo_id)):
        if repo_ids and r.repo_id not in repo_ids:
            continue
        revs = tuple(
            CachedRevision(rev.commit_hash, tuple(sorted(rev.refs)), len(rev.files), rev.size_on_disk, rev.snapshot_path)
            for rev in sorted(r.revisions, key=lambda v: -v.last_modified)
        )
        mine = tuple(p for p in partials if (p.repo_type, p.repo_id) == (r.repo_type, r.repo_id))
        repos.append(CachedRepo(r.repo_id, r.repo_type, r.repo_path, r.size_on_disk, r.nb_files, r.last_modified,
                                revs, mine))
    return CacheListing(cache_dir, tuple(repos), tuple(partials), warnings)


# ------------------------------------------------------------------------------------------------ verify


@dataclass
class BlobCheck:
    repo_id: str
    repo_type: str
    blob: Path
    oid: str
    ok: bool
    paths: list[tuple[str, str]]  # (commit, path in repo) that link to it
    actual: str | None = None
    repaired: bool = False

    def to_dict(self) -> dict:
        return {"repo_id": self.repo_id, "repo_type": self.repo_type, "blob": str(self.blob), "oid": self.oid,
                "ok": self.ok, "actual": self.actual, "repaired": self.repaired,
                "paths": [{"commit": c, "path": p} for c, p in self.paths]}


@dataclass
class VerifyReport:
    checked: list[BlobCheck] = field(default_factory=list)
    bytes_hashed: int = 0
    repair_errors: list[str] = field(default_factory=list)

    @property
    def bad(self) -> list[BlobCheck]:
        return [c for c in self.checked if not c.ok and not c.repaired]

    def to_dict(self) -> dict:
        return {"blobs_checked": len(self.checked), "bytes_hashed": self.bytes_hashed,
                "mismatches": [c.to_dict() for c in self.checked if not c.ok],
                "still_bad": len(self.bad), "repair_errors": self.repair_errors}


def _snapshot_links(repo_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """oid -> (commit, path) for every snapshot link that points at ``blobs/<oid>``."""
    blobs = os.path.normpath(repo_dir / "blobs")
    out: dict[str, list[tuple[str, str]]] = {}
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return out
    for snap in sorted(snaps.iterdir()):
        for p in sorted(snap.rglob("*")):
            if not p.is_symlink():
                continue
            target = os.path.normpath(os.path.join(p.parent, os.readlink(p)))
            if os.path.dirname(target) == blobs:
                out.setdefault(os.path.basename(target), []).append((snap.name, p.relative_to(snap).as_posix()))
    return out


HASH_WORKERS = 4


def verify_cache(cache_dir: Path, repo_ids: tuple[str, ...] = (), *, repair: bool = False, settings=None,
                 progress=None) -> VerifyReport:
    """Re-hash every blob a snapshot links to (sha256 for 64-hex names, git blob sha1 for 40-hex names),
    a few blobs at a time. Good blobs get qtk's verified record; with ``repair``, bad ones are removed
    and fetched again."""
    from concurrent.futures import ThreadPoolExecutor

    cache_dir = Path(cache_dir)
    todo = []
    for repo in list_cache(cache_dir, repo_ids).repos:
        target = CacheTarget(cache_dir, repo.repo_id, repo.repo_type)
        for oid, paths in sorted(_snapshot_links(repo.repo_path).items()):
            blob = repo.repo_path / "blobs" / oid
            if is_oid(oid) and blob.exists():  # else: not content-named, or a broken link (hf cache ls warns)
                todo.append((repo, target, oid, paths, blob))

    def check(item) -> BlobCheck:
        repo, target, oid, paths, blob = item
        st = os.stat(blob)  # before hashing: a record must describe the bytes that were hashed
        f = RemoteFile(paths[0][1], st.st_size, oid, lfs=len(oid) == 64)
        if progress is not None:
            progress(f"{repo.repo_id}: {paths[0][1]} ({st.st_size} bytes)")
        actual = digest_file(blob, f.digest)
        if actual == oid:
            with contextlib.suppress(OSError):
                target._mark(f, st, adopted=True)
        return BlobCheck(repo.repo_id, repo.repo_type, blob, oid, actual == oid, paths, actual)

    report = VerifyReport()
    workers = max(1, min(HASH_WORKERS, os.cpu_count() or 1, len(todo)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qtk-verify") as pool:
        for c in pool.map(check, todo):
            report.checked.append(c)
            report.bytes_hashed += c.blob.stat().st_size if c.blob.exists() else 0
    if repair and report.bad:
        _repair(cache_dir, report, settings)
    return report


def _glob_escape(path: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def _repair(cache_dir: Path, report: VerifyReport, settings) -> None:
    """Remove the bad blobs, then pull exactly the affected files of each affected commit again."""
    from dataclasses import replace

    from ..settings import Settings
    from .download import plan_pull, pull

    settings = replace(settings or Settings.from_env(), hub_cache=cache_dir)
    todo: dict[tuple[str, str, str], list[str]] = {}
    for check in report.bad:
        target = CacheTarget(cache_dir, check.repo_id, check.repo_type)
        for p in (check.blob, target.marker_path(check.oid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for commit, path in check.paths:
            todo.setdefault((check.repo_type, check.repo_id, commit), []).append(path)
    for (repo_type, repo_id, commit), paths in sorted(todo.items()):
        try:
            plan = plan_pull(repo_id, revision=commit, repo_type=repo_type, settings=settings,
                             include=[_glob_escape(p) for p in paths], check_access=False)
            pull(plan)
        except errors.QtkError as exc:
            report.repair_errors.append(f"{repo_id}@{commit[:12]}: {exc.message}")
            continue
    for check in report.bad:
        if check.blob.exists():
            digest = ("sha256", check.oid) if len(check.oid) == 64 else ("git-sha1", check.oid)
            check.repaired = digest_file(check.blob, digest) == check.oid


# ------------------------------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class PruneAction:
    kind: str  # partial, incomplete, lock, unreferenced-blob, record
    path: Path
    bytes: int
    reason: str
    guard: Path | None = None  # the lock a pull holds while it uses ``path``: prune takes it to remove it

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "bytes": self.bytes, "reason": self.reason}


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _prune_partials(cache_dir: Path, partials_older_than: float, now: float) -> list[PruneAction]:
    out = []
    for p in _partials(cache_dir):
        if p.in_use:
            continue
        blob = p.path.parent / p.oid
        done = blob.exists() and blob.stat().st_size == p.size
        folder = p.path.parent.parent.name
        if p.kind == "hf":
            if p.age_s >= GRACE_S:
                out.append(PruneAction("incomplete", p.path, p.path.stat().st_size,
                                       f"huggingface_hub partial, untouched for {p.age_s / 3600:.1f} h (never resumed)",
                                       cache_dir / ".locks" / folder / f"{p.oid}.lock"))
            continue
        reason = None
        if done:
            reason = "the file is already in the cache"
        elif p.resumable_bytes == 0:
            reason = "nothing resumable in it"
        elif p.age_s >= partials_older_than:
            reason = f"untouched for {p.age_s / 86400:.1f} days"
        if reason:
            state = p.path.with_name(p.path.name + STATE_SUFFIX)
            guard = _lock_base(cache_dir, folder, p.oid)
            out.append(PruneAction("partial", p.path, p.path.stat().st_size, reason, guard))
            if state.exists():
                out.append(PruneAction("partial", state, state.stat().st_size, "its resume state", guard))
    return out


def _prune_locks(cache_dir: Path, now: float) -> list[PruneAction]:
    out = []
    locks = cache_dir / ".locks"
    if not locks.is_dir():
        return out
    for p in sorted(locks.glob("*/*.qtk.lock")):
        if not is_locked(p):
            out.append(PruneAction("lock", p, 0, "no process holds it"))
    for p in sorted(locks.glob(f"*/*.qtk.lock{EXCL_SUFFIX}.*")):  # set aside by a take-over that crashed midway
        if _age(p, now) >= GRACE_S:
            out.append(PruneAction("lock", p, 0, "left over from an interrupted lock take-over"))
    for p in sorted(locks.glob(f"*/*.qtk.lock{EXCL_SUFFIX}")):
        info = holder_info(p) or {}
        age = _age(p, now)
        if age >= GRACE_S:
            out.append(PruneAction("lock", p, 0, f"heartbeat stopped {age / 3600:.1f} h ago (held by "
                                                 f"{Owner.from_dict(info).describe()})"))
    return out


def _prune_blobs(cache_dir: Path, now: float) -> list[PruneAction]:
    out = []
    for repo_dir in sorted(cache_dir.glob("*--*")):
        if _repo_of(repo_dir.name) is None or not (repo_dir / "blobs").is_dir():
            continue
        linked = _snapshot_links(repo_dir)
        for blob in sorted((repo_dir / "blobs").iterdir()):
            if not is_oid(blob.name) or blob.name in linked:
                continue
            if _age(blob, now) < GRACE_S or is_locked(_lock_base(cache_dir, repo_dir.name, blob.name)):
                continue  # may be a pull between placing the blob and linking it
            out.append(PruneAction("unreferenced-blob", blob, blob.lstat().st_size, "no snapshot links to it",
                                   _lock_base(cache_dir, repo_dir.name, blob.name)))
        records = repo_dir / MARKER_DIR
        for rec in sorted(records.iterdir()) if records.is_dir() else ():
            if not (repo_dir / "blobs" / rec.name).exists():
                out.append(PruneAction("record", rec, rec.stat().st_size, "its blob is gone"))
    return out


def prune_cache(cache_dir: Path, *, dry_run: bool = False, partials_older_than: float = 7 * 86400.0,
                now: float | None = None) -> list[PruneAction]:
    """Stale partial downloads and lock files, unreferenced blobs and orphan records. Returns what was (or,
    with ``dry_run``, would be) removed."""
    cache_dir = Path(cache_dir)
    now = time.time() if now is None else now
    actions = _prune_partials(cache_dir, partials_older_than, now) + _prune_locks(cache_dir, now) + _prune_blobs(
        cache_dir, now)
    if dry_run:
        return actions
    locker = Locker(notify=lambda text: None)
    try:
        return [a for a in actions if _remove(a, locker)]
    finally:
        locker.close()


def _remove(a: PruneAction, locker: Locker) -> bool:
    """Carry out one action; False when it was not done (its lock is held, it is gone already)."""
    if a.kind == "lock" and a.path.name.endswith(".qtk.lock"):
        lock = locker.try_acquire(a.path)  # unlink while holding it: a waiter re-checks the inode
        if lock is None:
            return False
        try:
            a.path.unlink()
        finally:
            lock.release()
        return True
    if a.kind == "lock" and a.path.name.endswith(EXCL_SUFFIX):
        info = holder_info(a.path) or {}
        with contextlib.suppress(OSError):
            return Locker._break(a.path, info.get("id"), a.path.stat().st_ino)
        return False
    with _guarded(a.guard, locker) as free:
        if not free:
            return False  # a pull took it since the listing (or another host may hold it): kept
        try:
            a.path.unlink()
        except FileNotFoundError:
            return False
    if a.kind == "unreferenced-blob":
        with contextlib.suppress(FileNotFoundError):
            (a.path.parent.parent / MARKER_DIR / a.path.name).unlink()
    return True


@contextlib.contextmanager
def _guarded(guard: Path | None, locker: Locker):
    """Holds ``guard`` (without waiting) while the body runs; yields False when someone else holds it. A
    qtk lock file this created is removed again while held (qtk's waiters re-check the inode); a
    huggingface_hub one is left as it is."""
    if guard is None:
        yield True
        return
    existed = os.path.lexists(guard)
    try:
        lock = locker.try_acquire(guard)
    except OSError:
        lock = None
    if lock is None:
        yield False
        return
    try:
        yield True
        if not existed and guard.name.endswith(".qtk.lock"):
            with contextlib.suppress(OSError):
                guard.unlink()
    finally:
        lock.release()
