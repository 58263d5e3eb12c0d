"""``qtk pull`` as a library: plan (preflight, no bytes move) -> fetch -> place.

    plan = plan_pull("meta-llama/Llama-3.1-8B-Instruct", include=["*.json", "*.safetensors"])
    print(plan.bytes_to_transfer)          # what a dry run reports
    result = pull(plan, connections=16)    # resumable, hash-verified, atomic
    result.path                            # snapshots/<commit>/ (or the --local-dir)

Preflight resolves the revision to a commit sha (pinned for the whole pull), lists the files
through huggingface_hub, applies the filters with huggingface_hub's own matcher (same semantics as
``hf download``), refuses unsafe names (revision, commit, oids and paths: :mod:`qtk.hub.names`; no path into a dot
directory such as ``.git``), refuses a layout that cannot be written as listed (``a`` and ``a/b``; a
symbolic link, file or directory in the way below the destination), checks access with one HEAD and
checks free disk space. Nothing is written until all of that passes.

Files with identical content share one blob in the cache: they become one fetch job (one lock, one
part file), and every path is linked to the blob when it is placed. A pull whose files are all
present writes nothing, so it works on a read-only cache.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .. import __version__, errors
from ..settings import Settings
from ._errors import HubContext, map_hub_errors, public_url
from ._metadata import check_file_access, list_repo_files, repo_commit
from ._retry import RetryPolicy
from ._fetch import DEFAULT_CHUNK, DEFAULT_CONNECTIONS, FetchJob, Fetcher, FetchStats, ProgressSink, resumable_bytes
from .auth import get_token
from .cache import DAMAGED, PRESENT, CacheTarget, LocalDirTarget, RemoteFile, not_writable
from .names import check_commit_sha, check_oid, check_pull_path, check_ref_name

__all__ = ["PlannedFile", "PullPlan", "PullResult", "plan_pull", "pull", "free_bytes", "human_bytes"]

REPO_TYPES = ("model", "dataset", "space")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor (what will hold it)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing ancestor)."""
    return shutil.disk_usage(existing_ancestor(path)).free


@dataclass(frozen=True)
class PlannedFile:
    file: RemoteFile
    present: bool  # already in place and verified
    resumable: int  # bytes an interrupted earlier run already finished
    part_exists: bool  # a preallocated part file already holds its disk space
    dest: Path
    damaged: bool = False  # a local copy exists but its bytes do not match (torn write, tampering): re-fetched

    def to_dict(self) -> dict:
        return {
            "path": self.file.path,
            "size": self.file.size,
            "lfs": self.file.lfs,
            "oid": self.file.oid,
            "present": self.present,
            "damaged": self.damaged,
            "resumable_bytes": self.resumable,
            "dest": str(self.dest),
        }


@dataclass(frozen=True)
class PullPlan:
    repo_id: str
    repo_type: str
    revision: str | None  # as asked
    commit: str  # as resolved, pinned for the whole pull
    endpoint: str
    target: CacheTarget | LocalDirTarget = field(repr=False)
    files: tuple[PlannedFile, ...]
    offline: bool = False
    token: str | None = field(default=None, repr=False)

    @property
    def root(self) -> Path:
        return self.target.root(self.commit)

    @property
    def total_bytes(self) -> int:
        return sum(p.file.size for p in self.files)

    @property
    def present_bytes(self) -> int:
        return sum(p.file.size for p in self.files if p.present)

    @property
    def missing(self) -> list[PlannedFile]:
        return [p for p in self.files if not p.present]

    @property
    def missing_blobs(self) -> dict[Path, list[PlannedFile]]:
        """Missing files grouped by their part file: identical content is fetched once."""
        groups: dict[Path, list[PlannedFile]] = {}
        for p in self.missing:
            groups.setdefault(self.target.part_path(p.file), []).append(p)
        return groups

    @property
    def bytes_to_transfer(self) -> int:
        return sum(g[0].file.size - g[0].resumable for g in self.missing_blobs.values())

    @property
    def disk_bytes_needed(self) -> int:
        # part files are preallocated to full size, so an existing one needs nothing more
        return sum(g[0].file.size for g in self.missing_blobs.values() if not g[0].part_exists)

    def to_dict(self) -> dict:
        return {
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": public_url(self.endpoint),  # never user:password@
            "target": self.target.kind,
            "path": str(self.root),
            "offline": self.offline,
            "files": [p.to_dict() for p in self.files],
            "total_bytes": self.total_bytes,
            "present_bytes": self.present_bytes,
            "bytes_to_transfer": self.bytes_to_transfer,
            "disk_bytes_needed": self.disk_bytes_needed,
        }


@dataclass(frozen=True)
class PullResult:
    plan: PullPlan
    stats: FetchStats

    @property
    def path(self) -> Path:
        return self.plan.root

    def to_dict(self) -> dict:
        d = self.plan.to_dict()
        d["stats"] = self.stats.to_dict()
        return d


def _validate_repo_id(repo_id: str, repo_type: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_type not in REPO_TYPES:
        raise errors.UsageError(f"Unknown repo type {repo_type!r}.", hint=f"Use one of {', '.join(REPO_TYPES)}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise errors.UsageError(f"Invalid repo id {repo_id!r}: {exc}", hint="Use the form namespace/name.") from exc


def _select(files: list[RemoteFile], include: Sequence[str], exclude: Sequence[str]) -> list[RemoteFile]:
    from huggingface_hub.utils import filter_repo_objects

    return list(
        filter_repo_objects(
            files, allow_patterns=list(include) or None, ignore_patterns=list(exclude) or None, key=lambda f: f.path
        )
    )


def _nothing_matched(repo_id: str, include, exclude, available: Iterable[str]) -> errors.NothingMatchedError:
    names = sorted(available)
    shown = "\n".join(f"  {n}" for n in names[:40])
    more = f"\n  ... and {len(names) - 40} more" if len(names) > 40 else ""
    return errors.NothingMatchedError(
        f"No file of {repo_id} matches --include {list(include) or '*'} --exclude {list(exclude) or '-'}. "
        f"The repo has {len(names)} file(s):\n{shown}{more}",
        hint="Fix the patterns (globs such as '*.safetensors' or 'subdir/*').",
    )


def _target(settings: Settings, repo_id: str, repo_type: str, local_dir: Path | None):
    return LocalDirTarget(local_dir) if local_dir is not None else CacheTarget(settings.hub_cache, repo_id, repo_type)


HASH_WORKERS = 4  # blobs hashed side by side when a plan must check unrecorded (or --verify) copies


def _statuses(target, commit: str, files: list[RemoteFile], verify: bool) -> dict[str, str]:
    """Status per blob (per path for --local-dir). A blob shared by several paths is checked once; blobs
    that need hashing (not placed by qtk, or --verify) are hashed in parallel (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    unique: dict[str, RemoteFile] = {}
    for f in files:
        unique.setdefault(f.oid if isinstance(target, CacheTarget) else f.path, f)
    workers = min(HASH_WORKERS, os.cpu_count() or 1, len(unique)) or 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qtk-check") as pool:
        futures = {k: pool.submit(target.status, commit, f, verify=verify) for k, f in unique.items()}
        return {k: fut.result() for k, fut in futures.items()}


def _planned(target, commit: str, files: list[RemoteFile], chunk_size: int, verify: bool = False) -> tuple[PlannedFile, ...]:
    out = []
    statuses = _statuses(target, commit, files, verify)
    for f in files:
        status = statuses[f.oid if isinstance(target, CacheTarget) else f.path]
        present = status == PRESENT
        part = target.part_path(f)
        out.append(
            PlannedFile(
                file=f,
                present=present,
                resumable=0 if present else resumable_bytes(part, f.size, f.digest, chunk_size),
                part_exists=(not present) and part.exists() and part.stat().st_size == f.size,
                dest=target.visible_path(commit, f),
                damaged=status == DAMAGED,
            )
        )
    return tuple(out)


def _check_names(files: list[RemoteFile]) -> None:
    """Every server-supplied name that becomes a path, before anything touches the filesystem
    (:func:`~qtk.hub.names.pull_path_problem`: no dot directory, no part over 200 bytes, ...)."""
    for f in files:
        check_pull_path(f.path)
        check_oid(f.oid, what=f"oid of {f.path!r}")
        if f.lfs != (len(f.oid) == 64) or not isinstance(f.size, int) or f.size < 0:
            raise errors.UnsafePathError(
                f"Refusing {f.path!r}: the listing gives it oid {f.oid!r} and size {f.size!r}, which do not fit "
                f"({'an LFS file has a 64-hex sha256' if f.lfs else 'a regular file has a 40-hex git sha1'}).",
                hint="Nothing was written. The endpoint is broken or hostile: report it.",
            )


def plan_pull(
    repo_id: str,
    *,
    revision: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    local_dir: str | Path | None = None,
    repo_type: str = "model",
    settings: Settings | None = None,
    check_access: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    verify: bool = False,
    retry: RetryPolicy | None = None,
) -> PullPlan:
    """Preflight a pull: everything but moving file bytes. Raises a qtk error on any problem.
    ``verify`` re-hashes what the cache already holds (damaged files are then re-fetched)."""
    settings = settings or Settings.from_env()
    _validate_repo_id(repo_id, repo_type)
    if revision is not None:
        check_ref_name(revision, what="--revision")
    target = _target(settings, repo_id, repo_type, Path(local_dir) if local_dir is not None else None)
    if settings.offline:
        return _plan_offline(settings, target, repo_id, repo_type, revision, include, exclude, chunk_size, verify)

    token = get_token(settings)
    tok = token.value if token else None
    ctx = HubContext(settings.endpoint, repo_id, revision or "main", has_token=tok is not None)
    policy = retry or RetryPolicy.from_env()  # every metadata request: timeouts, retries, Retry-After (capped)
    with map_hub_errors(ctx):
        commit = repo_commit(settings.endpoint, repo_id, repo_type, revision, tok, policy, ctx)
        check_commit_sha(commit, what=f"commit sha {ctx.shown_endpoint} gave for {repo_id}@{revision or 'main'}")
        files = list_repo_files(settings.endpoint, repo_id, repo_type, commit, tok, policy, ctx)
    selected = _select(files, include, exclude)
    if not selected:
        raise _nothing_matched(repo_id, include, exclude, (f.path for f in files))
    _check_names(selected)
    target.check_layout(commit, selected)  # a and a/b, links or files in the way: refused before any write
    if check_access:
        _check_access(settings, repo_id, repo_type, commit, selected[0], tok, policy)
    return PullPlan(
        repo_id=repo_id,
        repo_type=repo_type,
        revision=revision,
        commit=commit,
        endpoint=settings.endpoint,
        target=target,
        files=_planned(target, commit, selected, chunk_size, verify),
        token=tok,
    )


def _resolve_url(endpoint: str, repo_id: str, repo_type: str, commit: str, path: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, path, repo_type=repo_type, revision=commit, endpoint=endpoint)


def _check_access(settings: Settings, repo_id, repo_type, commit, f: RemoteFile, tok: str | None,
                  policy: RetryPolicy) -> None:
    """One HEAD on a file: gated repos list publicly but refuse downloads without access."""
    url = _resolve_url(settings.endpoint, repo_id, repo_type, commit, f.path)
    ctx = HubContext(settings.endpoint, repo_id, commit, filename=f.path, has_token=tok is not None)
    with map_hub_errors(ctx):
        check_file_access(url, settings.endpoint, tok, policy, ctx)


def _plan_offline(settings, target, repo_id, repo_type, revision, include, exclude, chunk_size, verify) -> PullPlan:
    if not isinstance(target, CacheTarget):
        raise errors.LocalNotFoundError(
            "HF_HUB_OFFLINE is set and --local-dir has no record of the remote revision.",
            hint="Unset HF_HUB_OFFLINE, or pull into the cache (no --local-dir) when online.",
        )
    commit = target.resolve_offline(revision)
    if commit is None:
        raise errors.LocalNotFoundError(
            f"HF_HUB_OFFLINE is set and {repo_id}@{revision or 'main'} is not in the cache ({settings.hub_cache}).",
            hint="Pull it once while online (unset HF_HUB_OFFLINE), or point HF_HUB_CACHE at a cache that has it.",
        )
    cached = target.cached_files(commit)
    selected = _select(cached, include, exclude)
    if not selected:
        raise errors.LocalNotFoundError(
            f"HF_HUB_OFFLINE is set and no cached file of {repo_id}@{commit[:12]} matches the filters "
            f"(cached: {', '.join(f.path for f in cached) or 'none'}).",
            hint="Pull the files while online, or change --include/--exclude.",
        )
    target.check_layout(commit, selected)
    return PullPlan(
        repo_id=repo_id,
        repo_type=repo_type,
        revision=revision,
        commit=commit,
        endpoint=settings.endpoint,
        target=target,
        files=_planned(target, commit, selected, chunk_size, verify),
        offline=True,
    )


def check_disk(plan: PullPlan, *, free: int | None = None) -> None:
    need = plan.disk_bytes_needed
    if need == 0:
        return
    where = plan.target.repo_dir if isinstance(plan.target, CacheTarget) else plan.target.local_dir
    free = free_bytes(where) if free is None else free
    if need > free:
        raise errors.DiskSpaceError(
            f"Not enough disk space in {where}: this pull needs {human_bytes(need)} ({need} bytes), "
            f"{human_bytes(free)} ({free} bytes) are free.",
            hint="Free some space, narrow the pull with --include/--exclude, or set HF_HUB_CACHE / --local-dir "
            "to a bigger filesystem.",
        )


def pull(
    plan: PullPlan,
    *,
    connections: int = DEFAULT_CONNECTIONS,
    chunk_size: int | None = None,  # None: sized per file from its size and the connections
    progress: ProgressSink | None = None,
    lock_timeout: float | None = None,
    retry: RetryPolicy | None = None,
) -> PullResult:
    """Download what ``plan`` says is missing, verify it, and move it into place atomically."""
    files = [p.file for p in plan.files]
    if plan.offline and plan.missing:
        bad = [p.file.path for p in plan.missing]
        raise errors.IntegrityError(
            f"HF_HUB_OFFLINE is set and {len(bad)} cached file(s) of {plan.repo_id} do not match their hash: "
            f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}.",
            hint="Go online and re-run `qtk pull` (it re-fetches exactly those files).",
        )
    if not plan.missing:
        with _writable(plan):
            plan.target.finalize(plan.revision, plan.commit, files)
        return PullResult(plan, FetchStats())
    check_disk(plan)
    target, commit = plan.target, plan.commit
    jobs = []
    for part, group in plan.missing_blobs.items():
        f = group[0].file
        same = [p.file for p in group]
        jobs.append(
            FetchJob(
                key=f.path,
                url=_resolve_url(plan.endpoint, plan.repo_id, plan.repo_type, commit, f.path),
                size=f.size,
                digest=f.digest,
                part_path=part,
                lock_path=target.lock_path(f),
                ctx=HubContext(plan.endpoint, plan.repo_id, commit, filename=f.path, has_token=plan.token is not None),
                on_complete=lambda part, same=same: target.place(commit, same, part),
                # a copy found damaged is re-hashed (its verified record may vouch for the old bytes)
                is_done=lambda f=f, v=group[0].damaged: target.is_present(commit, f, verify=v),
            )
        )
    fetcher = Fetcher(
        token=plan.token,
        endpoint=plan.endpoint,
        connections=connections,
        chunk_size=chunk_size,
        progress=progress,
        user_agent=f"qtk/{__version__}; pid/{os.getpid()}",
        lock_timeout=lock_timeout,
        policy=retry,
    )
    with _writable(plan):
        stats = fetcher.fetch_all(jobs)
        target.finalize(plan.revision, commit, files)
    return PullResult(plan, stats)


def _destination(plan: PullPlan) -> Path:
    return plan.target.hub_cache if isinstance(plan.target, CacheTarget) else plan.target.local_dir


@contextlib.contextmanager
def _writable(plan: PullPlan):
    """A read-only or foreign-owned destination is NotWritableError (exit 41), not an unexpected OSError;
    a disk that fills up while a small file, a record or a link is written (not only a body's range, which
    the fetcher maps itself) is DiskSpaceError (exit 40)."""
    try:
        yield
    except OSError as exc:
        if not isinstance(exc, errors.QtkError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise errors.DiskSpaceError(
                f"The disk holding {_destination(plan)} is full ({os.strerror(exc.errno)}) while writing "
                f"{exc.filename or 'a file'} of {plan.repo_id}.",
                hint="Free some space and re-run the same command: the partial download is kept and resumes.",
            ) from exc
        err = not_writable(exc, _destination(plan))
        if err is None:
            raise
        raise err from exc
