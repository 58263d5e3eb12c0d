"""The model store: what ``qtk serve STORE`` exposes, plus qtk's bookkeeping beside it.

    STORE/<org>/<model>-<recipe>        -> .qtk-provision/artifacts/<key>   (a symlink: the published repo)
    STORE/.qtk-provision/
        builds/<quantize key>/          quantize outputs, content-addressed by their inputs' hash
        reports/<verify key>.json       verify reports, addressed by theirs
        artifacts/<publish key>/        published versions: the build (hard links) + report + provenance
        records/<org>--<repo>.json      the latest outcome per published repo (what `status` shows)
        locks/                          file locks (one per artifact, one per build)
        events.jsonl                    every step of every run, one JSON object per line

Publishing swaps the symlink with one ``rename``: a reader (the mirror, a node pulling) sees the old
version or the new one, never a mix. Every directory and JSON file appears by rename of a finished
temporary, so a crash at any point leaves either the old or the new state. The mirror skips names that
start with a dot, so the bookkeeping is never served.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from .. import errors

__all__ = ["ProvisionStore"]

STATE_DIR = ".qtk-provision"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ProvisionStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.state = self.root / STATE_DIR
        self.builds = self.state / "builds"
        self.reports = self.state / "reports"
        self.artifacts = self.state / "artifacts"
        self.records = self.state / "records"
        self.locks = self.state / "locks"
        self.events_path = self.state / "events.jsonl"

    def init(self) -> None:
        for d in (self.builds, self.reports, self.artifacts, self.records, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    # -- locks ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, *, timeout: float | None, on_wait=None) -> Iterator[None]:
        """An exclusive lock across processes (and hosts sharing the store over a filesystem with
        working fcntl locks). ``on_wait`` is told once when another process holds it."""
        lock = FileLock(str(self.locks / f"{name}.lock"), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait:
                on_wait()
            try:
                lock.acquire(timeout=-1 if timeout is None else timeout)
            except Timeout:
                raise errors.LockTimeoutError(
                    f"Another qtk provision has held the lock {name!r} in {self.state} for more than {timeout:.0f} s.",
                    hint="Wait for it to finish, or raise --lock-timeout. A crashed holder releases its lock "
                         "automatically.",
                ) from None
        try:
            yield
        finally:
            lock.release()

    # -- files ------------------------------------------------------------------------------------

    def write_json(self, path: Path, obj) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, path)

    @staticmethod
    def read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable bookkeeping counts as absent: the step is redone

    def log_event(self, event: dict) -> None:
        line = (json.dumps(event, default=str) + "\n").encode()
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write with O_APPEND: lines of concurrent runs never interleave
        finally:
            os.close(fd)

    def events(self) -> list[dict]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.events_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def clean_stale(self) -> None:
        """Remove temporaries that crashed runs left (their process is gone)."""
        for d in (self.builds, self.artifacts, self.reports, self.records, self.root):
            if not d.is_dir():
                continue
            for p in d.glob(".*"):
                pid = p.name.rsplit("-", 1)[-1]
                if (".tmp-" in p.name or ".qtk-tmp-" in p.name or ".qtk-link-" in p.name) and pid.isdigit() \
                        and not _pid_alive(int(pid)):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
        for org in self.root.iterdir() if self.root.is_dir() else ():
            if org.is_dir() and not org.name.startswith("."):
                for p in org.glob(".*.qtk-link-*"):
                    pid = p.name.rsplit("-", 1)[-1]
                    if pid.isdigit() and not _pid_alive(int(pid)):
                        p.unlink(missing_ok=True)

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

    def kept_versions(self, repo_id: str) -> list[Path]:
        """Published version directories still on disk for ``repo_id``: the current one first, then the
        ones its record keeps (the previous version, for nodes mid-download). ``qtk serve`` serves each
        under its own commit."""
        rec = self.record(repo_id) or {}
        keys = [self.published_key(repo_id), (rec.get("published") or {}).get("key"), rec.get("previous")]
        out: list[Path] = []
        for k in keys:
            if isinstance(k, str) and k and "/" not in k and not k.startswith(".") and (self.artifacts / k).is_dir():
                if self.artifacts / k not in out:
                    out.append(self.artifacts / k)
        return out

    def publish(self, repo_id: str, key: str, build: Path, extra: dict[str, str]) -> Path:
        """Make ``STORE/<repo_id>`` the build plus ``extra`` files, atomically. Returns the version dir."""
        dest = self.artifacts / key
        if not dest.is_dir():
            tmp = self.artifacts / f".{key}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(build, tmp, copy_function=_link_or_copy)
            for name, text in extra.items():
                (tmp / name).unlink(missing_ok=True)  # never write through a hard link into the build
                (tmp / name).write_text(text)
            try:
                os.replace(tmp, dest)
            except OSError:  # published by a concurrent run in the meantime: identical by construction
                shutil.rmtree(tmp, ignore_errors=True)
        link = self.repo_path(repo_id)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() and not link.is_symlink():
            raise errors.UsageError(f"{link} exists and is not managed by qtk provision (not a symlink).",
                                    hint="Move it away, or publish under another org (publish.org).")
        tmp_link = link.parent / f".{link.name}.qtk-link-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(dest, link.parent), tmp_link)
        os.replace(tmp_link, link)  # the one atomic step
        return dest

    def prune_artifacts(self, keep: set[str]) -> list[str]:
        """Remove published versions no repo points to and no record keeps as the previous one."""
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


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
