"""Leases: who owns a temporary in a model store shared by several hosts (NFS, a Kubernetes volume).

Every temporary a provisioner creates in the store carries the id of its run's lease in its name
(``.<name>.tmp-<lease id>``, the id being ``<host>-<random>``). The lease is a small JSON file,
``STORE/.qtk-provision/leases/<lease id>.json`` (owner host, pid, pid namespace, boot id), whose
mtime a heartbeat thread refreshes every ``heartbeat`` seconds. A temporary is removed (only under
the store lock) when its lease has expired:

* the lease file's mtime is older than ``ttl`` seconds, measured against the mtime of a file this
  process has just touched on the same filesystem: both times come from the same clock (the file
  server's, on NFS), so host clocks never need to agree;
* or the owner is provably dead (:func:`qtk._proc.is_provably_dead`, the one rule qtk has: same host
  id, same boot, same PID namespace, and its pid gone or reused). A second host, or a pod with its own
  PID namespace, never qualifies: its pids mean nothing here, so only the heartbeat can expire it;
* a temporary whose lease file is missing (a run that ended, or a temporary written without a
  lease) counts as expired once the temporary itself has not changed for ``ttl`` seconds.

The host id (:func:`qtk._proc.host_id`) is ``$QTK_HOST_ID`` when set (tests simulate a second host with
it; a fleet may set it to a node name), else the host name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .._fs import fs_now, write_json
from .._proc import Owner, host_id, is_provably_dead

__all__ = ["Lease", "LeaseInfo", "host_id", "fs_now", "lease_expired", "TTL_S", "HEARTBEAT_S"]

TTL_S = 120.0  # a lease whose heartbeat is older than this is expired
HEARTBEAT_S = 10.0
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}-[0-9a-f]{12}$")


def is_lease_id(text: str) -> bool:
    return bool(_ID_RE.match(text))


def env_ttl(default: float = TTL_S) -> float:
    """``$QTK_LEASE_TTL`` seconds (a fleet with long NFS stalls may raise it), else ``default``."""
    with contextlib.suppress(ValueError, TypeError):
        v = float(os.environ.get("QTK_LEASE_TTL", ""))
        if v > 0:
            return v
    return default


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease file says (written by any host: every field is checked before use)."""

    id: str
    host: str | None
    pid: int | None
    start: str | None
    pidns: str | None
    boot: str | None

    @classmethod
    def read(cls, path: Path) -> LeaseInfo | None:
        try:
            d = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict):
            return None
        o = Owner.from_dict(d)
        return cls(path.stem, o.host, o.pid, o.start, o.pidns, o.boot)

    @property
    def owner(self) -> Owner:
        return Owner(self.host, self.boot, self.pidns, self.pid, self.start)


class Lease:
    """This run's lease: created by :meth:`start`, refreshed by a thread, removed by :meth:`close`."""

    def __init__(self, directory: Path, *, heartbeat: float = HEARTBEAT_S) -> None:
        self.dir = Path(directory)
        self.host = host_id()
        self.id = f"{self.host}-{secrets.token_hex(6)}"
        self.path = self.dir / f"{self.id}.json"
        self.heartbeat = heartbeat
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _info(self) -> dict:
        return {**Owner.current().on_host(self.host).to_dict(), "created": time.time()}

    def _write(self) -> None:
        write_json(self.path, self._info(), indent=None, newline=False, tmp=self.dir / f".{self.id}.json.tmp")

    def start(self) -> Lease:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._beat, name="qtk-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._mu, contextlib.suppress(OSError):
                if self.path.exists():
                    os.utime(self.path)
                else:  # removed by someone who judged us dead: say we live (our temporaries may be gone)
                    self._write()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._mu:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def lease_expired(info: LeaseInfo | None, lease_path: Path, now: float, *, ttl: float) -> bool:
    """Whether a lease is expired (``now`` from :func:`fs_now`; ``info`` None: unreadable or missing)."""
    try:
        age = now - os.stat(lease_path).st_mtime
    except FileNotFoundError:
        return True
    if age > ttl:
        return True
    if info is None:
        return False  # being written (or garbage that will age out)
    return is_provably_dead(info.owner)
