"""A minimum transfer rate per connection for the byte path (:mod:`qtk.hub._fetch`).

A read timeout bounds silence, not slowness: a server that drips one byte every 1.5 s under a 2 s
``HF_HUB_DOWNLOAD_TIMEOUT`` resets it with every byte and holds a range for days. So each request on
the byte path is also watched as a whole:

* **the response head** (status line and headers, or an error body being drained) must be complete
  within the read timeout *in total* (``HF_HUB_DOWNLOAD_TIMEOUT``, default 60 s), not per byte;
* **the body** must deliver at least ``QTK_MIN_RATE`` bytes/s (default 10,000) on average over every
  stretch of at least ``QTK_MIN_RATE_WINDOW`` seconds (default 30) that the worker spends waiting for
  it (time spent writing to disk does not count against the server).

A connection that falls short is cut (its socket is shut down, which wakes the blocked read) and
:class:`SlowTransfer` is raised in the worker; the fetcher restarts the range on a new connection, at
most ``QTK_SLOW_RESTARTS`` times per range (default 3), then stops with a NetworkError naming the
host. ``QTK_MIN_RATE=0`` turns the body rule off (the head rule stays).

Why 10 kB/s over 30 s: the rule is per connection and a pull uses 16, so a link is only judged slow
below 160 kB/s in all (1.3 Mbit/s: a congested hotspot still passes), while a drip or a stuck CDN node
is caught within half a minute and a server that stays just above the floor still has to deliver a
64 MiB range (the largest qtk asks for) within two hours. 50 kB/s per connection would fail whole pulls
on links below 6.4 Mbit/s. The rule is an average over a window, not a per-read limit, because TCP
delivers in bursts.

How it is measured without seeing inside a blocking read: the worker reports each read (how many bytes
it asked for, how many came, how long it waited), and the guard thread cuts a connection only when even
the most the pending read could have received leaves it under the rate, so a connection at the rate is
never cut. Reads are sized so that this bound is tight: at most half a window's worth of the minimum
rate while a connection is slow, and up to the caller's 1 MiB once it has shown it is fast.

The socket is reached through urllib3's documented extension point (a pool's ``ConnectionCls``): the
connection hands its socket to the transfer running on its thread when the response head is read.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from .. import errors

__all__ = ["MinRate", "RateGuard", "SlowTransfer", "Transfer", "install"]

ENV_RATE = "QTK_MIN_RATE"
ENV_WINDOW = "QTK_MIN_RATE_WINDOW"
ENV_RESTARTS = "QTK_SLOW_RESTARTS"
MIN_READ = 4096
_KEEP_WINDOWS = 4  # observations older than this many windows are dropped


class SlowTransfer(Exception):
    """The guard cut this thread's connection: too slow (``reason`` says how)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def _env_number(name: str, default: float, *, integer: bool = False, positive: bool = False) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = float("nan")
    if not value == value or value in (float("inf"), float("-inf")) or value < 0 or (positive and value == 0):
        kind = "a whole number" if integer else "a number"
        raise errors.UsageError(
            f"{name}={raw!r} is not {kind} {'> 0' if positive else '>= 0'}.",
            hint=f"Unset {name} for the default ({default:g}).",
        )
    return value


@dataclass(frozen=True)
class MinRate:
    """The policy: ``bytes_per_s`` averaged over ``window_s`` (0 = no rate rule), ``restarts`` per range."""

    bytes_per_s: float = 10_000.0
    window_s: float = 30.0
    restarts: int = 3

    @classmethod
    def from_env(cls) -> "MinRate":
        """``QTK_MIN_RATE`` (bytes/s, 0 = off), ``QTK_MIN_RATE_WINDOW`` (s), ``QTK_SLOW_RESTARTS``, read now."""
        return cls(
            bytes_per_s=_env_number(ENV_RATE, cls.bytes_per_s),
            window_s=_env_number(ENV_WINDOW, cls.window_s, positive=True),
            restarts=int(_env_number(ENV_RESTARTS, cls.restarts, integer=True)),
        )

    @property
    def enabled(self) -> bool:
        return self.bytes_per_s > 0

    def describe(self) -> str:
        return f"{self.bytes_per_s:,.0f} bytes/s over {self.window_s:g} s"


_WAIT, _BODY, _DONE = "wait", "body", "done"


@dataclass(eq=False)  # compared and hashed by identity (a guard holds a set of them)
class Transfer:
    """One request on one connection, from its response head to the end of its body."""

    where: str  # the origin, as qtk may print it
    rate: MinRate
    head_limit: float  # seconds for a response head (or a drained error body), in total
    clock: Callable[[], float] = time.monotonic
    phase: str = _WAIT
    cut_reason: str | None = None
    _sock: socket.socket | None = None
    _wait_t0: float | None = None  # when the current head or drain began (None: not waiting)
    _net: float = 0.0  # seconds spent in body reads so far
    _total: int = 0  # body bytes received
    _read_t0: float | None = None  # start of the read in flight
    _read_n: int = 0  # bytes the read in flight asked for
    _obs: list = field(default_factory=list)  # (net seconds, total bytes), oldest first
    _mu: threading.Lock = field(default_factory=threading.Lock)

    # -- the worker's side ---------------------------------------------------------------

    def attach(self, sock: socket.socket | None) -> None:
        """The connection's socket, once the request is sent: the head phase begins."""
        with self._mu:
            self._sock = sock
            self.phase, self._wait_t0 = _WAIT, self.clock()

    def head_done(self) -> None:
        with self._mu:
            self.phase, self._wait_t0 = _BODY, None
            if not self._obs:
                self._obs.append((self._net, self._total))

    @contextlib.contextmanager
    def opaque(self) -> Iterator[None]:
        """A read the guard cannot see into (draining an error body): bounded like a head."""
        with self._mu:
            self.phase, self._wait_t0 = _WAIT, self.clock()
        try:
            yield
        finally:
            with self._mu:
                self.phase, self._wait_t0 = _BODY, None

    def read_size(self, largest: int) -> int:
        """How much the next read may ask for: small enough that a drip is caught within the window,
        up to ``largest`` once the connection has shown it is fast."""
        if not self.rate.enabled:
            return largest
        with self._mu:
            rate = self._total / self._net if self._net > 0 else 0.0
        return int(max(MIN_READ, min(largest, max(self.rate.bytes_per_s, rate) * self.rate.window_s / 2)))

    def readinto(self, readinto: Callable[[memoryview], int], view: memoryview) -> int:
        """``readinto(view)``, accounted: the guard sees a read of ``len(view)`` bytes in flight."""
        with self._mu:
            self._read_t0, self._read_n = self.clock(), len(view)
        n = 0
        try:
            n = readinto(view)
            return n
        finally:
            with self._mu:
                now = self.clock()
                self._net += now - (now if self._read_t0 is None else self._read_t0)
                self._total += n or 0
                self._read_t0, self._read_n = None, 0
                if not self._obs or self._net - self._obs[-1][0] >= self.rate.window_s / 8:
                    self._obs.append((self._net, self._total))
                    while len(self._obs) > 2 and self._obs[1][0] <= self._net - _KEEP_WINDOWS * self.rate.window_s:
                        self._obs.pop(0)

    # -- the guard's side ----------------------------------------------------------------

    def verdict(self) -> str | None:
        """Why this transfer is too slow now, or None."""
        with self._mu:
            now = self.clock()
            if self.cut_reason is not None or self.phase == _DONE:
                return None
            if self._wait_t0 is not None:
                waited = now - self._wait_t0
                if waited >= self.head_limit:
                    return f"no complete response head within {self.head_limit:g} s (it trickled or stalled)"
                return None
            if self.phase != _BODY or not self.rate.enabled:
                return None
            in_flight = self._read_t0 is not None
            net = self._net + (now - self._read_t0 if in_flight else 0.0)
            most = self._total + (self._read_n if in_flight else 0)  # the most it can have received by now
            # the recorded points, and where the read in flight began (right after the last completed one)
            for t, b in (*self._obs, (self._net, self._total)):
                span = net - t
                if span < self.rate.window_s:
                    continue
                if most - b < self.rate.bytes_per_s * span * (1 - 1e-6):  # (a connection at the rate: kept)
                    return (f"at most {most - b:,} bytes in {span:.0f} s, under the minimum of "
                            f"{self.rate.describe()}")
            return None

    def cut(self, reason: str | None) -> None:
        """Shut the socket down (a blocked read returns at once); ``reason`` None: the pull is stopping."""
        with self._mu:
            if self.phase == _DONE or self.cut_reason is not None:
                return
            self.cut_reason = reason or ""
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP socket under TLS too

    def finish(self) -> None:
        with self._mu:
            self.phase, self._sock = _DONE, None


_local = threading.local()


class RateGuard:
    """Watches every transfer of one fetcher from one thread; cuts the slow ones.

    ``transient``: the exception types a cut surfaces as in the worker (converted to SlowTransfer)."""

    def __init__(self, rate: MinRate, head_limit: float, transient: tuple[type[BaseException], ...] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.head_limit = head_limit
        self.transient = transient
        self.clock = clock
        self.tick = max(0.02, min(0.5, rate.window_s / 8, head_limit / 8))
        self._active: set[Transfer] = set()
        self._mu = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, where: str) -> Iterator[Transfer]:
        """Watch the request made in this block (on this thread); a cut surfaces as SlowTransfer."""
        tr = Transfer(where, self.rate, self.head_limit, self.clock)
        with self._mu:
            self._active.add(tr)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="qtk-rate-guard", daemon=True)
                self._thread.start()
        _local.current = tr
        try:
            yield tr
        except self.transient as exc:
            if tr.cut_reason:
                raise SlowTransfer(where, tr.cut_reason) from exc
            raise
        finally:
            _local.current = None
            tr.finish()
            with self._mu:
                self._active.discard(tr)

    @staticmethod
    def current() -> Transfer | None:
        """The transfer running on this thread, if any."""
        return getattr(_local, "current", None)

    def _run(self) -> None:
        while not self._closed.wait(self.tick):
            with self._mu:
                active = list(self._active)
            for tr in active:
                if (why := tr.verdict()) is not None:
                    tr.cut(why)

    def close(self) -> None:
        """Stop watching, and cut what is still in flight (the pull is stopping: wake blocked reads)."""
        self._closed.set()
        with self._mu:
            active = list(self._active)
        for tr in active:
            tr.cut(None)
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._mu:  # a later fetch with the same fetcher starts a new watcher
            self._thread = None
            self._closed.clear()


# ------------------------------------------------------------------ urllib3: hand the socket over


def _watched_getresponse(conn, getresponse):
    tr = RateGuard.current()
    if tr is None:
        return getresponse()
    tr.attach(conn.sock)
    try:
        return getresponse()
    finally:
        tr.head_done()


class _WatchedHTTPConnection(HTTPConnection):
    def getresponse(self):  # type: ignore[override]
        return _watched_getresponse(self, super().getresponse)


class _WatchedHTTPSConnection(HTTPSConnection):
    def getresponse(self):  # type: ignore[override]
        return _watched_getresponse(self, super().getresponse)


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def install(pool: urllib3.PoolManager) -> urllib3.PoolManager:
    """Make ``pool``'s connections report their sockets to the transfer running on their thread."""
    pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return pool
