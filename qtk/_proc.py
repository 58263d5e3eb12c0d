"""Process identity: who owns a lock, a lease or a temporary, and when that owner is provably gone.

A file that outlives its process (a lock file, a lease, a half-written output) names its owner with an
:class:`Owner`: the host id, the boot id, the PID namespace, the pid and the process's start time (field
22 of ``/proc/<pid>/stat``, clock ticks since boot). Everything that decides "may I remove what that
process left" asks one rule, :func:`is_provably_dead`:

    an owner is dead only when it ran on this host (same host id), in this boot (same boot id) and in
    this PID namespace, and its pid is gone, or now belongs to a process that started at another time
    (the pid was reused).

Anything else (another host sharing the filesystem over NFS, a pod in its own PID namespace whose pids
mean nothing here, a host that rebooted under the same name, a record missing a field, an older qtk's
record) is never judged dead by its pid: only a heartbeat that stopped (measured by the waiter, see
:mod:`qtk.hub._lock` and :mod:`qtk.provision.lease`) or a person can free what it holds.

The host id is ``$QTK_HOST_ID`` when set (a fleet may set it to the node name; tests simulate a second
host with it), else the host name, reduced to ``[A-Za-z0-9._-]`` and 64 characters (it is used in file
names). Records come from other hosts and older versions: :meth:`Owner.from_dict` checks every field.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Callable

__all__ = ["Owner", "host_id", "boot_id", "pid_namespace", "start_time", "valid_pid", "probe_pid", "GONE",
           "is_provably_dead"]

MAX_PID = 4194304  # Linux's pid_max ceiling
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_FIELD_MAX = 256  # a longer string in a record is not one qtk wrote


def host_id() -> str:
    """This host's id in records and temporary names: ``$QTK_HOST_ID``, else the host name."""
    raw = os.environ.get("QTK_HOST_ID") or socket.gethostname() or "host"
    return _SAFE.sub("_", raw)[:64]


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def boot_id() -> str | None:
    """The kernel's random id of this boot (None where /proc does not have it)."""
    return _read("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> str | None:
    """This process's PID namespace, e.g. ``pid:[4026531836]`` (None without /proc)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """When ``pid`` started, in clock ticks since boot (tells a reused pid apart); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def valid_pid(value: object) -> int | None:
    """A pid from a record written by anyone: a positive int within Linux's pid range, else None."""
    return value if type(value) is int and 0 < value <= MAX_PID else None


class _Gone:
    def __repr__(self) -> str:
        return "GONE"


GONE = _Gone()  # what probe_pid says about a pid no process has


def probe_pid(pid: int) -> str | None | _Gone:
    """What this host says about ``pid`` now: :data:`GONE`, its start time, or None (alive, start unknown:
    another user's process where /proc hides it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return GONE
    except OSError:  # PermissionError: it exists, owned by another user
        pass
    return start_time(pid)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= _FIELD_MAX else None


@dataclass(frozen=True)
class Owner:
    """A process, as a record names it. Every field may be None (unknown): None never proves death."""

    host: str | None
    boot: str | None
    pidns: str | None
    pid: int | None
    start: str | None

    @classmethod
    def current(cls) -> Owner:
        """This process (read each time: a forked child is another owner)."""
        pid = os.getpid()
        return cls(host_id(), boot_id(), pid_namespace(), pid, start_time(pid))

    def to_dict(self) -> dict:
        return {"host": self.host, "boot": self.boot, "pidns": self.pidns, "pid": self.pid, "start": self.start}

    @classmethod
    def from_dict(cls, d: object) -> Owner:
        """The owner a record names (outside input: a field of the wrong type or size becomes None)."""
        if not isinstance(d, dict):
            return cls(None, None, None, None, None)
        start = d.get("start")
        start = str(start) if type(start) is int and start >= 0 else _text(start)  # older records: an int
        return cls(_text(d.get("host")), _text(d.get("boot")), _text(d.get("pidns")), valid_pid(d.get("pid")), start)

    def describe(self) -> str:
        """``pid 123 on host node-a``, safe to print (printable characters, bounded)."""
        return f"pid {self.pid if self.pid is not None else '?'} on host {_shown(self.host)}"

    def same_machine(self, here: Owner) -> bool:
        """Same host, same boot and same PID namespace as ``here``, each known: the pid means the same."""
        return (None not in (self.host, self.boot, self.pidns)
                and (self.host, self.boot, self.pidns) == (here.host, here.boot, here.pidns))

    def on_host(self, host: str) -> Owner:
        return replace(self, host=host)


def _shown(value: object) -> str:
    text = "?" if value is None else str(value)
    return "".join(c if c.isprintable() else "?" for c in text[:64])


def is_provably_dead(owner: Owner, *, here: Owner | None = None,
                     probe: Callable[[int], str | None | _Gone] = probe_pid) -> bool:
    """True only when ``owner`` ran on this host, boot and PID namespace (``here``: this process by
    default) and its pid is gone or was reused (another start time). ``probe`` asks the process table."""
    here = Owner.current() if here is None else here
    if owner.pid is None or not owner.same_machine(here):
        return False
    now = probe(owner.pid)
    if now is GONE:
        return True
    return owner.start is not None and now is not None and now != owner.start
