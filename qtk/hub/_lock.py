"""Per-file locks for the download cache that stay safe where advisory locks do not work.

Two kinds of lock, chosen per filesystem:

* ``flock``: ``fcntl.flock`` on ``<name>.lock`` (what filelock and huggingface_hub use). The kernel
  drops it when the process dies, so there is nothing to clean up. After locking, the file is
  checked to still be the one at the path (a ``qtk cache prune`` may have removed it in between).
* ``exclusive-file``: ``<name>.lock.excl`` created with ``O_CREAT | O_EXCL`` and holding the
  owner's identity (:class:`qtk._proc.Owner`: host id, boot id, PID namespace, pid, start time) and a
  random id. A heartbeat thread refreshes its mtime and checks that the file is still ours. A waiter
  breaks it when the owner is provably dead (:func:`qtk._proc.is_provably_dead`: same host, boot and
  PID namespace, pid gone or reused; another host's pid proves nothing here), or when its heartbeat
  has not moved for ``stale_after`` seconds *as the waiter measures it* (the waiter's monotonic clock:
  no clock comparison between hosts).

The exclusive-file kind is used when ``flock`` fails with ENOLCK / ENOSYS / EOPNOTSUPP (NFS
mounted ``nolock``, Lustre without ``flock``), and on filesystems where ``flock`` is known to
succeed without excluding other hosts (NFS ``local_lock=flock|all``, Lustre ``localflock``,
BeeGFS). The choice is announced once per filesystem on stderr.

Locks are a hint that saves bandwidth; correctness never depends on them: every byte is hashed
before it is placed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .._proc import Owner, host_id, is_provably_dead

__all__ = ["Lock", "Locker", "LockWaitTimeout", "lock_mode", "holder_info", "is_locked", "FLOCK", "EXCLUSIVE_FILE", "EXCL_SUFFIX"]

FLOCK = "flock"
EXCLUSIVE_FILE = "exclusive-file"
EXCL_SUFFIX = ".excl"
STALE_AFTER_S = 60.0  # a heartbeat unchanged this long (seen by the waiter) is a dead holder
HEARTBEAT_S = 5.0
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
# Filesystems where flock can succeed on this host without excluding the others.
_LOCAL_ONLY_FS = {"beegfs"}

_modes: dict[int, str] = {}  # st_dev -> mode: one decision (and one announcement) per filesystem per process
_modes_mu = threading.Lock()


class LockWaitTimeout(TimeoutError):
    """Waited ``timeout`` seconds for a lock another process holds."""

    def __init__(self, path: Path, waited: float, holder: dict | None) -> None:
        super().__init__(f"{path}: still locked after {waited:.0f} s")
        self.path, self.waited, self.holder = path, waited, holder


def _mount_of(path: Path) -> tuple[str, str, str] | None:
    """(fstype, mount options + super options, mount point) of the mount holding ``path``."""
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mountinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best: tuple[str, str, str] | None = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 6 or len(rfields) < 3:
            continue
        mnt = fields[4].replace("\\040", " ")
        if real == mnt or real.startswith(mnt.rstrip("/") + "/"):
            if best is None or len(mnt) >= len(best[2]):
                best = (rfields[0], fields[5] + "," + rfields[2], mnt)
    return best


def flock_is_local_only(path: Path) -> bool:
    """True on mounts where flock succeeds but does not exclude other hosts."""
    m = _mount_of(path)
    if m is None:
        return False
    fstype, opts, _ = m
    options = set(opts.split(","))
    if fstype in ("nfs", "nfs4"):
        return bool(options & {"local_lock=flock", "local_lock=all"})
    if fstype == "lustre":
        return "localflock" in options
    return fstype in _LOCAL_ONLY_FS


def _announce(text: str) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(f"qtk: {text}\n")
        sys.stderr.flush()


def lock_mode(directory: Path, *, probe_error: int | None = None) -> str:
    """The lock kind for files in ``directory`` (decided once per filesystem and process)."""
    dev = os.stat(directory).st_dev
    with _modes_mu:
        mode = _modes.get(dev)
        if mode is not None and probe_error is None:
            return mode
        if probe_error is not None:
            why = f"flock() fails there ({errno.errorcode.get(probe_error, probe_error)})"
        elif flock_is_local_only(directory):
            why = "flock() there does not exclude other hosts"
        else:
            _modes[dev] = FLOCK
            return FLOCK
        if mode != EXCLUSIVE_FILE:
            _announce(f"file locks do not work on the filesystem of {directory}: {why}; using lock files "
                      f"created exclusively, with a heartbeat (a holder silent for {STALE_AFTER_S:.0f} s is taken over).")
        _modes[dev] = EXCLUSIVE_FILE
        return EXCLUSIVE_FILE


def is_locked(base: Path) -> bool:
    """Whether a process holds the lock ``base`` (either kind) right now, or may (an exclusive lock file of
    an owner not provably dead). Creates nothing (read-only caches)."""
    excl = Path(str(base) + EXCL_SUFFIX)
    if excl.exists():
        return not is_provably_dead(Owner.from_dict(holder_info(excl)))
    try:
        fd = os.open(base, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # flock does not work here: only exclusive lock files count
        return False
    finally:
        os.close(fd)  # also drops the shared lock


def holder_info(path: Path) -> dict | None:
    """What an exclusive lock file says about its holder (None if absent or unreadable)."""
    try:
        info = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@dataclass
class Lock:
    """A held lock. ``lost`` turns True if an exclusive lock file was taken over by another process."""

    path: Path  # the file that is locked (``.lock`` or ``.lock.excl``)
    mode: str
    fd: int = -1
    token: str | None = None
    ino: int | None = None
    lost: bool = False
    _released: bool = False
    _mu: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def release(self) -> None:
        with self._mu:
            if self._released:
                return
            self._released = True
        if self.mode == FLOCK:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
            return
        if self.lost:
            return
        # rename aside first (atomic), so that a lock another process created meanwhile is never removed
        aside = self.path.with_name(f"{self.path.name}.released-{secrets.token_hex(6)}")
        try:
            os.rename(self.path, aside)
        except OSError:
            return
        if not _owned(aside, self.token):
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)

    @property
    def released(self) -> bool:
        return self._released


def _open_lock_file(path: Path) -> int:
    """The lock file, created with 0666 less the umask (a team cache with umask 002 stays usable by the
    group, as huggingface_hub's are); one made by another user without write access for us is opened
    read-only: flock does not need write access."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _shown(value: object) -> str:
    """A value from someone else's lock file, safe to print (printable, at most 64 characters)."""
    text = "?" if value is None else str(value)
    return "".join(c if c.isprintable() else "?" for c in text[:64])


def _owned(path: Path, token: str | None) -> bool:
    info = holder_info(path)
    return bool(info) and info.get("id") == token


@dataclass
class _Seen:
    key: tuple | None = None
    since: float = 0.0


class Locker:
    """Takes and holds locks for one pull; ``close()`` stops the heartbeat (held locks are released)."""

    def __init__(self, *, stale_after: float | None = None, heartbeat: float | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        self.stale_after = STALE_AFTER_S if stale_after is None else stale_after
        self.heartbeat = HEARTBEAT_S if heartbeat is None else heartbeat
        self.notify = notify or _announce
        self.host = host_id()
        self._held: list[Lock] = []
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._seen: dict[Path, _Seen] = {}

    # ------------------------------------------------------------------ public

    def try_acquire(self, path: Path) -> Lock | None:
        """The lock on ``path`` if it is free now, else None. Raises OSError if it cannot be created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if lock_mode(path.parent) == FLOCK:
            try:
                return self._try_flock(path)
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                lock_mode(path.parent, probe_error=exc.errno)
        return self._try_exclusive(path)

    def acquire(self, path: Path, *, timeout: float | None = None, poll: float = 0.1,
                tick: Callable[[], bool] | None = None) -> Lock | None:
        """Wait for the lock on ``path``. ``tick`` runs between tries; when it returns False the wait
        ends and None is returned. Raises :class:`LockWaitTimeout` after ``timeout`` seconds."""
        t0 = time.monotonic()
        while True:
            lock = self.try_acquire(path)
            if lock is not None:
                return lock
            if tick is not None and not tick():
                return None
            waited = time.monotonic() - t0
            if timeout is not None and waited >= timeout:
                raise LockWaitTimeout(path, waited, self.holder(path))
            time.sleep(poll)

    def holder(self, path: Path) -> dict | None:
        return holder_info(Path(str(path) + EXCL_SUFFIX))

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=2)
        with self._mu:
            held, self._held = self._held, []
        for lock in held:
            lock.release()

    # ------------------------------------------------------------------- flock

    @staticmethod
    def _try_flock(path: Path) -> Lock | None:
        while True:
            fd = _open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return Lock(path, FLOCK, fd=fd)
            os.close(fd)  # removed (pruned) between open and flock: lock the new file instead

    # ---------------------------------------------------------- exclusive file

    def _try_exclusive(self, base: Path, *, may_break: bool = True) -> Lock | None:
        path = Path(str(base) + EXCL_SUFFIX)
        token = secrets.token_hex(12)
        info = {**Owner.current().on_host(self.host).to_dict(), "id": token, "created": time.time()}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if may_break and self._maybe_break(path):
                return self._try_exclusive(base, may_break=False)
            return None
        try:
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        self._seen.pop(path, None)
        lock = Lock(path, EXCLUSIVE_FILE, token=token, ino=ino)
        with self._mu:
            self._held.append(lock)
            if self._beat is None:
                self._beat = threading.Thread(target=self._heartbeat, name="qtk-lock-heartbeat", daemon=True)
                self._beat.start()
        return lock

    def _maybe_break(self, path: Path) -> bool:
        """Break the lock file if its holder is gone; True if it was removed (by us or just before)."""
        info = holder_info(path) or {}  # read first: the open revalidates NFS's cached attributes
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return True
        seen = self._seen.setdefault(path, _Seen())
        key = (st.st_ino, st.st_mtime_ns, info.get("id"))
        now = time.monotonic()
        if key != seen.key:
            seen.key, seen.since = key, now
        reason = None
        owner = Owner.from_dict(info)
        if is_provably_dead(owner, here=Owner.current().on_host(self.host)):
            reason = f"its process (pid {owner.pid} on this host) is gone"
        elif now - seen.since >= self.stale_after:
            reason = f"its heartbeat has not moved for {now - seen.since:.0f} s"
        if reason is None:
            return False
        self._seen.pop(path, None)
        if not self._break(path, info.get("id"), st.st_ino):
            return False
        who = f"{_shown(info.get('host'))} pid {_shown(info.get('pid'))}"
        self.notify(f"took over the stale lock {path} (held by {who}): {reason}.")
        return True

    @staticmethod
    def _break(path: Path, token: str | None, ino: int) -> bool:
        """Remove the lock file if it is still the one judged stale (rename first: atomic)."""
        aside = path.with_name(f"{path.name}.broken-{secrets.token_hex(6)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False  # another waiter broke it first
        info = holder_info(aside) or {}
        same = info.get("id") == token and os.stat(aside).st_ino == ino
        if not same:  # a fresh lock slipped in between: put it back (same inode, its holder never notices)
            with contextlib.suppress(OSError):
                os.link(aside, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        return same

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._mu:
                self._held = [lk for lk in self._held if not lk.released]
                held = list(self._held)
            for lock in held:
                if lock.lost or lock.released:
                    continue
                try:
                    st = os.stat(lock.path)
                    ok = st.st_ino == lock.ino and _owned(lock.path, lock.token)
                    if ok:
                        os.utime(lock.path)
                except OSError:
                    ok = False
                if not ok and not lock.released:
                    lock.lost = True
                    self.notify(f"the lock {lock.path} was taken over by another process; "
                                "this process stops writing the file's resume state.")
