"""The model store: what ``qtk serve STORE`` exposes, plus qtk's bookkeeping beside it.

    STORE/<org>/<model>-<recipe>        -> .qtk-provision/artifacts/<key>   (a symlink: the published repo)
    STORE/.qtk-provision/
        builds/<quantize key>/          quantize outputs, content-addressed by their inputs' hash
        reports/<verify key>.json       verify reports, addressed by theirs
        sources/<source key>/           a model's planned files exactly (symlinks into the HF cache): what
                                        quantize and verify read, so they see what the keys hashed
        artifacts/<publish key>/        published versions: the build (hard links) + report + provenance
        records/<org>--<repo>.json      the latest outcome per published repo (what `status` shows)
        locks/                          locks (qtk.hub._lock: flock, or exclusive lock files where flock
                                        does not exclude other hosts)
        leases/<host>-<id>.json         one per live run: owner host, pid, heartbeat (its mtime)
        events/<run>--<lease>.jsonl     every step of one run, one JSON object per line (one writer per
                                        file: concurrent runs on NFS never interleave; read merged)

Publishing swaps the symlink with one ``rename``: a reader (the mirror, a node pulling) sees the old
version or the new one, never a mix. Every directory and JSON file appears by rename of a finished
temporary, fsynced first and its directory after (:mod:`qtk._fs`), so a crash or a power loss at any
point leaves either the old or the new state. The mirror skips names that
start with a dot, so the bookkeeping is never served.

Temporaries are named ``.<name>.tmp-<lease id>`` (host + random id, :mod:`qtk.provision.lease`) and
removed only under the store lock, once their lease has expired: never because a pid is not alive on
*this* host (a second host or a pod in its own PID namespace has pids that mean nothing here).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

from .. import _fs, _json, errors
from ..hub._lock import Locker, LockWaitTimeout
from .lease import Lease, LeaseInfo, env_ttl, fs_now, host_id, is_lease_id, lease_expired

__all__ = ["ProvisionStore"]

STATE_DIR = ".qtk-provision"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


_TMP_RE = re.compile(r"\.(?:tmp|qtk-link)-(?P<id>[^/]+)$")
_LEGACY_RE = re.compile(r"\.(?:tmp|qtk-tmp|qtk-link|qtk-old)-\d+$")  # pid-only names of qtk before leases
LEGACY_TTL_S = 24 * 3600.0  # a pid-only temporary untouched this long is garbage, whoever wrote it
WORKSPACE_SUFFIX = ".build"  # builds/.<key>.build/: where a build is written; .owner names the lease
OWNER = ".owner"


class ProvisionStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.state = self.root / STATE_DIR
        self.builds = self.state / "builds"
        self.reports = self.state / "reports"
        self.sources = self.state / "sources"
        self.artifacts = self.state / "artifacts"
        self.records = self.state / "records"
        self.locks = self.state / "locks"
        self.leases = self.state / "leases"
        self.events_dir = self.state / "events"
        self.legacy_events = self.state / "events.jsonl"  # written by qtk before per-run event files
        self.lease: Lease | None = None  # this process's run lease (names its temporaries)
        self._events_mu = threading.Lock()

    def init(self) -> None:
        for d in (self.builds, self.reports, self.artifacts, self.records, self.locks, self.leases, self.events_dir,
                  self.sources):
            d.mkdir(parents=True, exist_ok=True)

    def start_lease(self) -> Lease:
        self.lease = Lease(self.leases).start()
        return self.lease

    def tmp_name(self, name: str, kind: str = "tmp") -> str:
        """``.<name>.<kind>-<lease id>``: the temporary's owner is this run's lease (or, for a
        store used without one, a fresh id whose missing lease file lets it age out)."""
        owner = self.lease.id if self.lease else f"{host_id()}-{secrets.token_hex(6)}"
        return f".{name}.{kind}-{owner}"

    # -- locks ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, *, timeout: float | None, on_wait=None) -> Iterator[None]:
        """An exclusive lock across processes and hosts (qtk.hub._lock: flock, or an exclusive lock
        file with a heartbeat where flock does not exclude other hosts). ``on_wait`` is told once when
        another process holds it."""
        path = self.locks / f"{name}.lock"
        locker = Locker()
        try:
            held = locker.try_acquire(path)
            if held is None:
                if on_wait:
                    on_wait()
                try:
                    held = locker.acquire(path, timeout=timeout, poll=0.2)
                except LockWaitTimeout:
                    raise errors.LockTimeoutError(
                        f"Another qtk provision has held the lock {name!r} in {self.state} for more than {timeout:.0f} s.",
                        hint="Wait for it to finish, or raise --lock-timeout. A crashed holder releases its lock "
                             "automatically.",
                    ) from None
            try:
                yield
            finally:
                held.release()
        finally:
            locker.close()

    # -- files ------------------------------------------------------------------------------------

    def write_json(self, path: Path, obj) -> None:
        _fs.write_json(path, obj, tmp=path.with_name(self.tmp_name(path.name)))

    @staticmethod
    def read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable bookkeeping counts as absent: the step is redone

    def log_event(self, event: dict) -> None:
        """Append to this run's own event file (one writer per file: on NFS, O_APPEND writes of two
        clients can overwrite each other; separate files cannot), flushed to the server each line."""
        run = re.sub(r"[^A-Za-z0-9_-]", "_", str(event.get("run") or "run"))
        writer = self.lease.id if self.lease else f"{host_id()}-{os.getpid()}"
        path = self.events_dir / f"{run}--{writer}.jsonl"  # a run on Ray has one writer per task
        line = (_json.dumps(event) + "\n").encode()
        with self._events_mu:
            self.events_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def event_files(self) -> list[Path]:
        files = sorted(self.events_dir.glob("*.jsonl")) if self.events_dir.is_dir() else []
        return ([self.legacy_events] if self.legacy_events.is_file() else []) + files

    def events(self) -> list[dict]:
        """Every run's events, merged in time order (a run's own lines keep their order)."""
        out = []
        for f in self.event_files():
            with contextlib.suppress(OSError, UnicodeDecodeError):
                for line in f.read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        e = json.loads(line)
                        if isinstance(e, dict):
                            out.append(e)
        out.sort(key=_ts_order)  # stable: equal timestamps keep each file's order
        return out

    def clean_stale(self, *, timeout: float | None = None, ttl: float | None = None) -> list[str]:
        """Remove, under the store lock, the temporaries whose lease has expired; a build workspace's
        resume checkpoint is kept as ``builds/.<key>.resume`` for the next run of that key. Returns
        what was removed."""
        ttl = env_ttl() if ttl is None else ttl
        removed: list[str] = []
        with self.lock("store", timeout=timeout):
            now = fs_now(self.leases)
            verdicts: dict[str, bool] = {}

            def expired(lid: str) -> bool:
                if lid not in verdicts:
                    lp = self.leases / f"{lid}.json"
                    verdicts[lid] = lease_expired(LeaseInfo.read(lp), lp, now, ttl=ttl)
                return verdicts[lid]

            dirs = [self.builds, self.artifacts, self.reports, self.records, self.leases, self.sources, self.root]
            dirs += [d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")] \
                if self.root.is_dir() else []
            for d in dirs:
                for p in d.glob(".*") if d.is_dir() else ():
                    if d == self.builds and p.name.endswith(WORKSPACE_SUFFIX) and p.is_dir():
                        if (p / OWNER).exists() and self._owner_expired(p, now, ttl, expired):
                            self._clean_workspace(p)
                            removed.append(str(p))
                    elif self._stale(p, now, ttl, expired):
                        _remove(p)
                        removed.append(str(p))
            for lp in self.leases.glob("*.json") if self.leases.is_dir() else ():
                if lp.stem != (self.lease.id if self.lease else None) and expired(lp.stem):
                    lp.unlink(missing_ok=True)  # its temporaries are gone: the lease file goes last
        return removed

    def _stale(self, p: Path, now: float, ttl: float, expired) -> bool:
        m = _TMP_RE.search(p.name)
        if m and is_lease_id(m.group("id")):
            lid = m.group("id")
            if (self.leases / f"{lid}.json").exists():
                return expired(lid)
            return _age(p, now) > ttl  # no lease file: a temporary of a finished run, or written without one
        if _LEGACY_RE.search(p.name):
            return _age(p, now) > LEGACY_TTL_S
        if p.parent == self.leases and p.name.endswith(".json.tmp"):
            return _age(p, now) > ttl
        return False

    def _owner_expired(self, ws: Path, now: float, ttl: float, expired) -> bool:
        try:
            lid = (ws / OWNER).read_text().strip()
        except FileNotFoundError:
            return _age(ws, now) > ttl  # being claimed, or its owner released it
        except (OSError, UnicodeDecodeError):
            lid = ""
        if is_lease_id(lid) and (self.leases / f"{lid}.json").exists():
            return expired(lid)
        return _age(ws / OWNER, now) > ttl

    def _clean_workspace(self, ws: Path) -> None:
        """An expired run's workspace: everything goes but a method's resume checkpoint
        (``.<key>.qtk-work``, kept at its path: hours of GPU work for the next run of the key)."""
        key = ws.name[1:-len(WORKSPACE_SUFFIX)]
        for p in ws.iterdir():
            if p.name != f".{key}.qtk-work" and p.name != OWNER:
                _remove(p)
        (ws / OWNER).unlink(missing_ok=True)  # last: the workspace is free
        with contextlib.suppress(OSError):
            ws.rmdir()  # only when no checkpoint is left

    def workspace(self, key: str) -> Path:
        return self.builds / f".{key}{WORKSPACE_SUFFIX}"

    def claim_workspace(self, key: str, *, timeout: float | None = None, poll: float = 2.0) -> Path:
        """Own ``builds/.<key>.build/`` for this run's lease (callers hold the build's lock; this guards
        filesystems where that lock is only a hint): wait while another live lease owns it."""
        ws = self.workspace(key)
        t0 = time.monotonic()
        while True:
            with self.lock("store", timeout=timeout):
                ws.mkdir(exist_ok=True)
                now = fs_now(self.leases)
                owner = None
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    owner = (ws / OWNER).read_text().strip()
                mine = self.lease.id if self.lease else None
                free = owner in (None, mine) or self._owner_expired(
                    ws, now, env_ttl(), lambda lid: lease_expired(LeaseInfo.read(self.leases / f"{lid}.json"),
                                                                  self.leases / f"{lid}.json", now, ttl=env_ttl()))
                if free:
                    if owner not in (None, mine):
                        self._clean_workspace(ws)
                        ws.mkdir(exist_ok=True)
                    _fs.write_atomic(ws / OWNER, mine or "", tmp=ws / self.tmp_name("owner"))
                    return ws
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise errors.LockTimeoutError(f"Another run (lease {owner}) is still building {key} in {ws}.",
                                              hint="Wait for it, or raise --lock-timeout.")
            time.sleep(poll)

    def release_workspace(self, key: str, *, finished: bool) -> None:
        """Finished: the workspace goes. Failed: its resume checkpoint stays for the next run."""
        ws = self.workspace(key)
        if finished:
            shutil.rmtree(ws, ignore_errors=True)
        elif ws.is_dir():
            self._clean_workspace(ws)

    # -- sources ----------------------------------------------------------------------------------

    def source_view(self, key: str, files: dict[str, Path]) -> Path:
        """``sources/<key>/``: a checkpoint directory holding exactly ``files`` (path in the repo -> the
        file in the HF cache) as symlinks, so that quantize and verify read the model's planned files and
        nothing else of its snapshot (files other pulls placed there, files the manifest excludes). The
        key names the repo, commit, cache path and file list: a view never changes once made, and every
        node (same paths: the store and the HF cache are shared) uses the same one."""
        view = self.sources / key
        if _view_matches(view, files):
            return view
        missing = sorted(rel for rel, target in files.items() if not target.is_file())
        if missing:
            raise errors.LocalNotFoundError(
                f"{len(missing)} planned file(s) of the model are not in the HF cache: {', '.join(missing[:5])}.",
                hint="The pull did not place them (or the cache was pruned meanwhile): run the provision again.")
        self.sources.mkdir(parents=True, exist_ok=True)
        tmp = self.sources / self.tmp_name(key)
        _remove(tmp)
        tmp.mkdir()
        for rel, target in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, tmp / rel)
        _fs.fsync_tree(tmp)  # the links are entries of their directories
        try:
            _fs.replace_durable(tmp, view)
        except OSError:  # made meanwhile by another run (identical), or a broken one from a crash
            if not _view_matches(view, files):
                with self.lock("store", timeout=None):
                    if not _view_matches(view, files):
                        _remove(view)
                        _fs.replace_durable(tmp, view)
            _remove(tmp)
        return view

    # -- builds, reports --------------------------------------------------------------------------

    def build_dir(self, key: str) -> Path:
        return self.builds / key

    def report_path(self, key: str) -> Path:
        return self.reports / f"{key}.json"

    def record_path(self, repo_id: str) -> Path:
        return self.records / (repo_id.replace("/", "--") + ".json")

    def record(self, repo_id: str) -> dict | None:
        return self.read_json(self.record_path(repo_id))

    def records_all(self) -> list[dict]:
        return [r for p in sorted(self.records.glob("*.json")) if (r := self.read_json(p))]

    # -- publishing -------------------------------------------------------------------------------

    def repo_path(self, repo_id: str) -> Path:
        org, name = repo_id.split("/")
        return self.root / org / name

    def published_key(self, repo_id: str) -> str | None:
        link = self.repo_path(repo_id)
        if not link.is_symlink():
            return None
        target = Path(os.readlink(link)).name
        return target if (self.artifacts / target).is_dir() else None

    @property
    def versions_root(self) -> Path:
        """Where published versions live (:class:`qtk.mirror.store.PublishedVersions`, for ``qtk serve``)."""
        return self.artifacts

    def kept_keys(self, repo_id: str, record: dict | None = None) -> list[str]:
        """The kept-versions policy, the one place it is written: a repo keeps the version its link points
        to, the one its record says was published, and the one published before it (``previous``: nodes
        that resolved it may still be downloading it). Current first; ``record``: the repo's, if read."""
        rec = (self.record(repo_id) if record is None else record) or {}
        out: list[str] = []
        for k in (self.published_key(repo_id), (rec.get("published") or {}).get("key"), rec.get("previous")):
            if isinstance(k, str) and k and "/" not in k and not k.startswith(".") and k not in out:
                out.append(k)
        return out

    def kept_versions(self, repo_id: str) -> list[Path]:
        """Published version directories still on disk for ``repo_id`` (:meth:`kept_keys`), the current one
        first. ``qtk serve`` serves each under its own commit (:class:`qtk.mirror.store.PublishedVersions`)."""
        return [self.artifacts / k for k in self.kept_keys(repo_id) if (self.artifacts / k).is_dir()]

    def publish(self, repo_id: str, key: str, build: Path, extra: dict[str, str]) -> Path:
        """Make ``STORE/<repo_id>`` the build plus ``extra`` files, atomically. Returns the version dir."""
        dest = self.artifacts / key
        if not dest.is_dir():
            tmp = self.artifacts / self.tmp_name(key)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(build, tmp, copy_function=_link_or_copy)
            for name, text in extra.items():
                (tmp / name).unlink(missing_ok=True)  # never write through a hard link into the build
                (tmp / name).write_text(text)
            _fs.fsync_tree(tmp)  # a version is complete on disk before it can be published
            try:
                _fs.replace_durable(tmp, dest)
            except OSError:  # published by a concurrent run in the meantime: identical by construction
                shutil.rmtree(tmp, ignore_errors=True)
        link = self.repo_path(repo_id)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() and not link.is_symlink():
            raise errors.UsageError(f"{link} exists and is not managed by qtk provision (not a symlink).",
                                    hint="Move it away, or publish under another org (publish.org).")
        tmp_link = link.parent / self.tmp_name(link.name, "qtk-link")
        tmp_link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(dest, link.parent), tmp_link)
        _fs.replace_durable(tmp_link, link)  # the one atomic step
        return dest

    def prune_artifacts(self, keep: set[str] | None = None) -> list[str]:
        """Remove the published versions no repo keeps (:meth:`kept_keys` of every recorded repo), or all
        but ``keep`` when given. Returns the keys removed."""
        if keep is None:
            keep = {k for r in self.records_all() if isinstance(r.get("repo_id"), str)
                    for k in self.kept_keys(r["repo_id"], r)}
        removed = []
        for d in self.artifacts.iterdir() if self.artifacts.is_dir() else ():
            if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed

    def disk_usage(self, path: Path) -> int:
        """Bytes under ``path``, hard links counted once."""
        seen, total = set(), 0
        for dirpath, _dirs, files in os.walk(path):
            for f in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, f))
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_size
        return total


def _age(p: Path, now: float) -> float:
    try:
        return now - os.lstat(p).st_mtime
    except FileNotFoundError:
        return 0.0


def _view_matches(view: Path, files: dict[str, Path]) -> bool:
    """``view`` holds exactly ``files``, each a symlink to its target, which exists."""
    if not view.is_dir():
        return False
    have = {str(p.relative_to(view)) for p in view.rglob("*") if p.is_symlink() or not p.is_dir()}
    if have != set(files):
        return False
    try:
        return all(os.readlink(view / rel) == str(t) and t.is_file() for rel, t in files.items())
    except OSError:
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def now_iso() -> str:
    """UTC with microseconds: events of two writers in the same second still merge in the order they
    happened (on one host; across hosts as far as their clocks agree)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _ts_order(event: dict) -> str:
    """Sort key of an event's ``ts``: whole-second stamps (older qtk) as ``.000000``."""
    ts = str(event.get("ts", ""))
    return ts[:-1] + ".000000Z" if ts.endswith("Z") and "." not in ts else ts
