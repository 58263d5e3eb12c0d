"""The bulk byte path: parallel HTTP Range requests into preallocated part files, resumable
across processes, hash-verified before anything is moved into place.

Per file:

* ``<part>`` is preallocated to the final size and written in place with ``os.pwrite``;
* ``<part>.state.json`` records which chunks are complete (and how far in-flight chunks got),
  flushed about once a second after ``fdatasync``, so a re-run after ``kill -9``, Ctrl-C, a network
  failure or a reboot resumes from what was finished;
* a per-file lock (:mod:`qtk.hub._lock`: ``flock``, or exclusive lock files with a heartbeat where
  ``flock`` does not work) keeps two processes, also on two hosts, off the same part file; only the
  holder writes the part file and its state. While waiting for another process's lock, the state of
  what this process already downloads keeps being flushed;
* a hasher thread reads complete chunks back in order while later chunks still download, so the
  sha256 (LFS) or git blob sha1 (small files) is ready when the last byte lands. A mismatch is
  re-fetched once from zero, then reported; a bad file is never handed to ``on_complete``.

urllib3 carries the bytes (measured 3-5x cheaper per byte than httpx here). Redirects are followed
by hand so that ``Authorization`` is only ever sent to the endpoint's own origin.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import queue
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urljoin, urlsplit

import urllib3

from .. import errors
from ._errors import HubContext, error_for_status
from ._lock import Lock, Locker, LockWaitTimeout

__all__ = ["new_hasher", "resumable_bytes", "FetchJob", "FetchStats", "Fetcher", "ProgressSink", "DEFAULT_CHUNK", "DEFAULT_CONNECTIONS"]

DEFAULT_CHUNK = 16 * 1024 * 1024
DEFAULT_CONNECTIONS = 16
READ_SIZE = 1024 * 1024
STATE_VERSION = 1
STATE_FLUSH_S = 0.05  # also bounds what a kill -9 loses
STATE_SYNC_S = 5.0  # fdatasync + durable record this often (reboot safety without a per-write cost)
MAX_ATTEMPTS = 6  # per range, counted since the last byte of progress
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_EXPIRED_STATUS = {401, 403, 410}  # a signed CDN URL that expired: resolve again once


class ProgressSink(Protocol):
    def file_started(self, key: str, label: str, total: int, completed: int) -> None: ...
    def advance(self, key: str, nbytes: int) -> None: ...
    def file_finished(self, key: str) -> None: ...
    def message(self, text: str) -> None: ...


class _NullProgress:
    def file_started(self, key, label, total, completed):
        pass

    def advance(self, key, nbytes):
        pass

    def file_finished(self, key):
        pass

    def message(self, text):
        pass


@dataclass(frozen=True)
class FetchJob:
    """One file to fetch. ``digest`` is ``("sha256", hex)`` or ``("git-sha1", hex)``."""

    key: str  # unique, e.g. the path in the repo
    url: str
    size: int
    digest: tuple[str, str]
    part_path: Path
    lock_path: Path
    ctx: HubContext
    on_complete: Callable[[Path], None]  # moves the verified part file into place
    is_done: Callable[[], bool] = lambda: False  # another process may finish it first


@dataclass
class FetchStats:
    bytes_downloaded: int = 0  # bytes that crossed the network (re-fetches included)
    bytes_resumed: int = 0  # bytes reused from earlier runs' part files
    files_fetched: int = 0
    files_skipped: int = 0  # finished by another process while we waited for the lock
    retries: int = 0
    refetches: int = 0  # whole-file re-downloads after a hash mismatch
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def new_hasher(digest: tuple[str, str], size: int):
    algo, _ = digest
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "git-sha1":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
        return h
    raise ValueError(f"unknown digest algorithm {algo!r}")


def _read_state(part_path: Path, size: int, digest: tuple[str, str], chunk_size: int) -> dict | None:
    """The sidecar state of ``part_path`` if it belongs to this exact file, else None."""
    state_path = part_path.with_name(part_path.name + ".state.json")
    try:
        state = json.loads(state_path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if (
        state.get("version") != STATE_VERSION
        or state.get("size") != size
        or state.get("digest") != list(digest)
        or state.get("chunk_size") != chunk_size
        or not part_path.exists()
    ):
        return None  # stale or foreign: start over
    return state


def resumable_bytes(part_path: Path, size: int, digest: tuple[str, str], chunk_size: int = DEFAULT_CHUNK) -> int:
    """How many bytes of ``part_path`` an earlier run finished (0 if none or stale)."""
    state = _read_state(part_path, size, digest, chunk_size)
    if state is None:
        return 0
    key = "" if state.get("boot_id") == _boot_id() else "durable_"
    done = sum(min(chunk_size, size - i * chunk_size) for i in state.get(key + "done", []) if 0 <= i * chunk_size < size)
    return done + sum(int(v) for v in (state.get(key + "partial") or {}).values())


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), port)


class _BodyReader:
    """Reads a response body straight into the caller's buffer.

    On a plain-TCP connection with a Content-Length body, the socket is read directly with
    ``MSG_WAITALL``: one system call (and one GIL release) per 1 MiB instead of one per few kB
    through http.client's buffered reader. Measured here on loopback, 16 connections, 1 GiB:
    0.35-0.48 s against 0.5-1.2 s. TLS sockets, chunked bodies, or an urllib3/http.client without
    the expected internals fall back to http.client's ``readinto`` (still no per-read allocation,
    unlike urllib3's own ``readinto``, which with 16 threads left ~100 MB of glibc arenas).
    """

    def __init__(self, response, length: int) -> None:
        self._response = response
        self._raw = None
        fp = getattr(response, "_fp", None)  # http.client.HTTPResponse
        self.readinto = getattr(fp, "readinto", None) or response.readinto
        conn = getattr(response, "_connection", None)
        sock = getattr(conn, "sock", None)
        buffered = getattr(fp, "fp", None)
        if (
            isinstance(sock, socket.socket)
            and type(sock) is socket.socket  # not an ssl.SSLSocket: flags are refused there
            and getattr(fp, "chunked", True) is False
            and getattr(fp, "length", None) == length
            and hasattr(buffered, "read1")
            and hasattr(fp, "_close_conn")
        ):
            self._fp, self._sock, self._buffered = fp, sock, buffered
            self._timeout = sock.gettimeout()
            self.readinto = self._first_read

    def _first_read(self, mv: memoryview) -> int:
        # http.client may already hold the first few kB of the body in its buffer.
        data = self._buffered.read1(len(mv))
        mv[: len(data)] = data
        self._sock.settimeout(None)  # blocking, so MSG_WAITALL waits; SO_RCVTIMEO bounds a stall
        secs = int(self._timeout or 60)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", secs, 0))
        self._raw = True
        self.readinto = self._raw_read
        return len(data)

    def _raw_read(self, mv: memoryview) -> int:
        return self._sock.recv_into(mv, len(mv), socket.MSG_WAITALL)

    def finish(self) -> None:
        """The whole body was read: leave http.client as if it had read it itself."""
        if self._raw:
            self._sock.settimeout(self._timeout)
            self._fp.length = 0
            self._fp._close_conn()


class _Retryable(Exception):
    """A transient failure: retry the range after a backoff."""


class _Expired(Exception):
    """The resolved (CDN) URL is no longer valid: resolve it again."""


class _Stop(Exception):
    pass


@dataclass
class _FileTask:
    job: FetchJob
    chunk: int
    lock: Lock
    fd: int = -1
    chunks: list[tuple[int, int]] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    partial: dict[int, int] = field(default_factory=dict)  # chunk index -> bytes written from its start
    url: str | None = None  # resolved (after redirects)
    send_auth: bool = True
    hash_next: int = 0
    hasher: object = None
    refetched: bool = False
    resolved_again: bool = False
    finished: bool = False
    mm: mmap.mmap | None = None  # read-only map for hashing
    view: memoryview | None = None
    durable: tuple[list[int], dict[str, int]] | None = None  # progress confirmed by fdatasync
    mu: threading.Lock = field(default_factory=threading.Lock)
    resolve_mu: threading.Lock = field(default_factory=threading.Lock)
    dirty: bool = False

    def unmap(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None

    @property
    def state_path(self) -> Path:
        return self.job.part_path.with_name(self.job.part_path.name + ".state.json")


class Fetcher:
    """Download many files over a shared pool of keep-alive connections.

    ``connections`` worker threads each take the next chunk (a ``Range``) of any file, so one big
    file gets all connections and many small files proceed side by side.
    """

    def __init__(
        self,
        *,
        token: str | None,
        endpoint: str,
        connections: int = DEFAULT_CONNECTIONS,
        chunk_size: int = DEFAULT_CHUNK,
        progress: ProgressSink | None = None,
        user_agent: str = "qtk",
        timeout: tuple[float, float] = (10.0, 60.0),
        lock_timeout: float | None = None,
    ) -> None:
        if connections < 1:
            raise errors.UsageError(f"--connections must be >= 1 (got {connections}).")
        self.token = token
        self.endpoint_origin = _origin(endpoint)
        self.connections = connections
        self.chunk_size = max(chunk_size, READ_SIZE)
        self.progress = progress or _NullProgress()
        self.user_agent = user_agent
        self.timeout = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        self.lock_timeout = lock_timeout
        self.stats = FetchStats()
        self._stats_mu = threading.Lock()
        self._pool = urllib3.PoolManager(num_pools=8, maxsize=connections, block=False, retries=False)
        self._work: queue.Queue = queue.Queue()
        self._hash_q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._tasks: list[_FileTask] = []
        self._pending_files = 0
        self._all_done = threading.Condition()
        self._locker = Locker()
        self._last_wait_flush = self._last_wait_sync = 0.0

    # ------------------------------------------------------------------ public

    def fetch_all(self, jobs: list[FetchJob]) -> FetchStats:
        """Fetch ``jobs``; returns when all are verified and placed, raises the first fatal error."""
        t0 = time.monotonic()
        workers = [threading.Thread(target=self._worker, name=f"qtk-fetch-{i}", daemon=True) for i in range(self.connections)]
        hasher = threading.Thread(target=self._hash_loop, name="qtk-hash", daemon=True)
        for t in workers:
            t.start()
        hasher.start()
        try:
            waiting: list[FetchJob] = []
            for job in jobs:
                if not self._open(job, blocking=False):
                    waiting.append(job)
            for job in waiting:  # held by another process: wait for it (flushing our own state), then maybe skip
                if self._stop.is_set():
                    break
                self.progress.message(f"waiting for another process to finish {job.key} ...")
                self._open(job, blocking=True)
            self._wait_until_done()
        except BaseException:
            self._stop.set()
            raise
        finally:
            try:
                self._shutdown(workers, hasher)
            finally:
                self._locker.close()
                self.stats.wall_s = time.monotonic() - t0
        if self._error is not None:
            raise self._error
        return self.stats

    # ------------------------------------------------------------ preparation

    def _open(self, job: FetchJob, *, blocking: bool) -> bool:
        """Lock and prepare ``job``'s part file and queue its missing chunks. False if the lock is busy."""
        if not blocking:
            lock = self._locker.try_acquire(job.lock_path)  # released by the hasher thread
            if lock is None:
                return False
        else:
            try:
                lock = self._locker.acquire(job.lock_path, timeout=self.lock_timeout, tick=self._tick_while_waiting)
            except LockWaitTimeout as exc:
                who = exc.holder or {}
                held_by = f" (held by {who.get('host')} pid {who.get('pid')})" if who else ""
                raise errors.LockTimeoutError(
                    f"Another process has been downloading {job.key} for over {exc.waited:.0f} s{held_by}.",
                    hint="Wait for it to finish, or raise --lock-timeout. What this process finished is kept.",
                ) from None
            if lock is None:  # the pull failed or was stopped while waiting
                return True
        if job.is_done():
            lock.release()
            with self._stats_mu:
                self.stats.files_skipped += 1
            return True
        task = _FileTask(job=job, chunk=self.chunk_size, lock=lock)
        try:
            self._prepare(task)
        except BaseException:
            self._close(task)
            raise
        self._tasks.append(task)
        with self._all_done:
            self._pending_files += 1
        self._enqueue(task)
        return True

    def _prepare(self, task: _FileTask, *, fresh: bool = False) -> None:
        job = task.job
        job.part_path.parent.mkdir(parents=True, exist_ok=True)
        size, cs = job.size, task.chunk
        task.chunks = [(s, min(s + cs, size)) for s in range(0, size, cs)]
        task.done, task.partial = set(), {}
        if not fresh:
            self._load_state(task)
        if task.fd < 0:
            task.fd = os.open(job.part_path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(task.fd).st_size != size:
            os.ftruncate(task.fd, 0)
            task.done, task.partial = set(), {}
            if size:
                try:
                    os.posix_fallocate(task.fd, 0, size)
                except (AttributeError, OSError):
                    os.ftruncate(task.fd, size)
        task.hash_next = 0
        task.hasher = new_hasher(job.digest, size)
        resumed = sum(e - s for i, (s, e) in enumerate(task.chunks) if i in task.done) + sum(task.partial.values())
        with self._stats_mu:
            self.stats.bytes_resumed += resumed
        self.progress.file_started(job.key, job.key, size, resumed)
        task.dirty = True

    def _load_state(self, task: _FileTask) -> None:
        job = task.job
        state = _read_state(job.part_path, job.size, job.digest, task.chunk)
        if state is None:
            return
        # After a reboot the page cache is gone: trust only what an fdatasync vouched for.
        key = "" if state.get("boot_id") == _boot_id() else "durable_"
        n = len(task.chunks)
        task.done = {i for i in state.get(key + "done", []) if 0 <= i < n}
        for k, v in (state.get(key + "partial") or {}).items():
            i = int(k)
            s, e = task.chunks[i] if 0 <= i < n else (0, 0)
            if i not in task.done and 0 < v < e - s:
                task.partial[i] = int(v)

    def _tick_while_waiting(self) -> bool:
        """Between tries for another process's lock: keep our own resume state current."""
        now = time.monotonic()
        if now - self._last_wait_flush >= STATE_FLUSH_S:
            sync = now - self._last_wait_sync >= STATE_SYNC_S
            for t in list(self._tasks):
                self._flush_state(t, sync=sync)
            self._last_wait_flush = now
            self._last_wait_sync = now if sync else self._last_wait_sync
        return not self._stop.is_set()

    def _flush_state(self, task: _FileTask, *, sync: bool = False) -> None:
        """Write the sidecar state. Without ``sync`` it survives kill -9 (the page cache does);
        with ``sync`` an fdatasync first makes the recorded progress survive a reboot too."""
        if task.lock.lost:  # the state file belongs to the lock holder only
            return
        with task.mu:
            if task.finished or task.fd < 0 or not (task.dirty or sync and task.durable is None):
                return
            done = sorted(task.done)
            partial = {str(k): v for k, v in dict(task.partial).items()}  # dict() copies atomically
            task.dirty = False
            fd = task.fd
        if sync:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)  # everything recorded above was written before this call
                task.durable = (done, partial)
        durable_done, durable_partial = task.durable or ([], {})
        state = {
            "version": STATE_VERSION,
            "size": task.job.size,
            "digest": list(task.job.digest),
            "chunk_size": task.chunk,
            "boot_id": _boot_id(),
            "done": done,
            "partial": partial,
            "durable_done": durable_done,
            "durable_partial": durable_partial,
        }
        tmp = task.state_path.with_name(task.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, task.state_path)

    def _enqueue(self, task: _FileTask) -> None:
        pending = [i for i in range(len(task.chunks)) if i not in task.done]
        if not task.chunks or not pending:
            self._hash_q.put(task)  # nothing to download: verify what is there
            return
        for i in pending:
            self._work.put((task, i))

    # ---------------------------------------------------------------- workers

    def _worker(self) -> None:
        buf = bytearray(READ_SIZE)
        while True:
            item = self._work.get()
            if item is None or self._stop.is_set():
                return
            task, i = item
            try:
                self._fetch_chunk(task, i, buf)
            except _Stop:
                return
            except BaseException as exc:  # fatal for the whole pull
                self._fail(exc)
                return
            self._hash_q.put(task)

    def _fetch_chunk(self, task: _FileTask, i: int, buf: bytearray) -> None:
        start, end = task.chunks[i]
        attempts = 0
        while True:
            if self._stop.is_set():
                raise _Stop
            pos = start + task.partial.get(i, 0)
            try:
                self._ensure_resolved(task)
                self._get_range(task, i, pos, end, buf)
                with task.mu:
                    task.done.add(i)
                    task.partial.pop(i, None)
                    task.dirty = True
                return
            except _Expired:
                with task.mu:
                    again = not task.resolved_again
                    task.resolved_again = True
                    task.url = None
                if not again:
                    raise errors.AccessDeniedError(
                        f"The download URL for {task.job.key} keeps being refused.",
                        hint="Check your access to the repo, then re-run (finished bytes are kept).",
                    ) from None
            except _Retryable as exc:
                made_progress = start + task.partial.get(i, 0) > pos
                attempts = 1 if made_progress else attempts + 1
                if attempts >= MAX_ATTEMPTS:
                    raise errors.NetworkError(
                        f"Downloading {task.job.key} failed after {MAX_ATTEMPTS} attempts: {exc}",
                        hint="Check the network, then re-run: finished bytes are kept and the download resumes.",
                    ) from None
                with self._stats_mu:
                    self.stats.retries += 1
                delay = min(30.0, 0.25 * 2**attempts) * (0.5 + random.random())
                if self._stop.wait(delay):
                    raise _Stop from None

    def _headers(self, url: str, task: _FileTask, extra: dict | None = None) -> dict:
        h = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if self.token and _origin(url) == self.endpoint_origin and task.send_auth:
            h["Authorization"] = f"Bearer {self.token}"
        if extra:
            h.update(extra)
        return h

    def _ensure_resolved(self, task: _FileTask) -> None:
        """Follow redirects once per file (HEAD); auth only while on the endpoint's origin."""
        with task.resolve_mu:
            if task.url is None:
                self._resolve(task)

    def _resolve(self, task: _FileTask) -> None:
        url = task.job.url
        send_auth = True
        for _ in range(10):
            headers = self._headers(url, task) if send_auth else {"User-Agent": self.user_agent}
            r = self._request("HEAD", url, headers)
            if r.status in (301, 302, 303, 307, 308) and r.headers.get("Location"):
                nxt = urljoin(url, r.headers["Location"])
                if _origin(nxt) != self.endpoint_origin:
                    send_auth = False  # never hand the token to a CDN
                url = nxt
                continue
            if r.status >= 400:
                self._raise_http(task, r)
            with task.mu:
                task.url, task.send_auth = url, send_auth
            return
        raise errors.NetworkError(f"Too many redirects for {task.job.url}.")

    def _request(self, method: str, url: str, headers: dict, preload: bool = True):
        try:
            return self._pool.request(
                method, url, headers=headers, redirect=False, retries=False,
                preload_content=preload, decode_content=False, timeout=self.timeout,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None

    def _raise_http(self, task: _FileTask, r) -> None:
        if r.status in _RETRY_STATUS:
            raise _Retryable(f"HTTP {r.status}")
        on_endpoint = task.url is None or _origin(task.url) == self.endpoint_origin
        if r.status in _EXPIRED_STATUS and not on_endpoint:
            raise _Expired
        raise error_for_status(r.status, r.headers.get("X-Error-Code"), r.headers.get("X-Error-Message"), task.job.ctx)

    def _get_range(self, task: _FileTask, i: int, pos: int, end: int, buf: bytearray) -> None:
        if pos >= end:
            return
        url = task.url
        assert url is not None
        headers = self._headers(url, task, {"Range": f"bytes={pos}-{end - 1}"})
        r = self._request("GET", url, headers, preload=False)
        body = None
        try:
            if r.status == 200 and pos == 0 and end == task.job.size:
                pass  # server ignored Range, but we wanted the whole file anyway
            elif r.status != 206:
                if r.status < 400:
                    raise errors.NetworkError(
                        f"The server answered HTTP {r.status} to a Range request for {task.job.key}.",
                        hint="Re-run with --connections 1, or use a server that supports HTTP Range.",
                    )
                self._raise_http(task, r)
            else:
                crange = r.headers.get("Content-Range", "")
                expect = f"bytes {pos}-{end - 1}/"
                if not crange.startswith(expect):
                    raise _Retryable(f"unexpected Content-Range {crange!r} (wanted {expect}...)")
                total = crange.rsplit("/", 1)[-1]
                if total != "*" and int(total) != task.job.size:
                    raise errors.IntegrityError(
                        f"{task.job.key}: the server says the file has {total} bytes, the repo listing said "
                        f"{task.job.size}.",
                        hint="The repo may have changed under the pinned revision; re-run `qtk pull`.",
                    )
            mv = memoryview(buf)
            fd, chunk_start = task.fd, task.chunks[i][0]
            body = _BodyReader(r, end - pos)
            readinto = body.readinto
            while pos < end:
                if self._stop.is_set():
                    raise _Stop
                want = min(READ_SIZE, end - pos)
                try:
                    n = readinto(mv[:want])
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    raise _Retryable(f"{type(exc).__name__}: {exc}") from None
                if not n:
                    raise _Retryable(f"connection closed after {pos} of {task.job.size} bytes")
                os.pwrite(fd, mv[:n], pos)
                pos += n
                task.partial[i] = pos - chunk_start  # single writer per chunk; read by the flusher
                task.dirty = True
                with self._stats_mu:
                    self.stats.bytes_downloaded += n
                self.progress.advance(task.job.key, n)
        finally:
            if pos >= end:
                if body is not None:
                    body.finish()
                r.release_conn()
            elif r.status >= 400:
                r.drain_conn()
            else:
                r.close()

    # ---------------------------------------------------------------- hashing

    def _hash_loop(self) -> None:
        while True:
            task = self._hash_q.get()
            if task is None:
                return
            try:
                self._advance_hash(task)
            except BaseException as exc:
                self._fail(exc)

    def _advance_hash(self, task: _FileTask) -> None:
        """Hash the complete chunks at the front of the file, in order.

        The part file is read through one read-only mmap per file: hashlib reads the page cache
        directly (measured here: 0.07 s of system time per GiB, against 0.4 s for pread into a buffer).
        """
        if task.finished:
            return
        while task.hash_next < len(task.chunks):
            with task.mu:
                ready = task.hash_next in task.done
            if not ready:
                return
            if task.view is None:
                task.mm = mmap.mmap(task.fd, task.job.size, prot=mmap.PROT_READ)
                task.view = memoryview(task.mm)
            s, e = task.chunks[task.hash_next]
            task.hasher.update(task.view[s:e])
            if hasattr(mmap, "MADV_DONTNEED"):  # unmap what was hashed: RSS stays flat (the page cache keeps it)
                task.mm.madvise(mmap.MADV_DONTNEED, s, e - s)
            task.hash_next += 1
        task.unmap()
        self._finish(task)

    def _finish(self, task: _FileTask) -> None:
        job = task.job
        got = task.hasher.hexdigest()
        if got != job.digest[1].lower():
            with self._stats_mu:
                self.stats.refetches += 1
            if task.refetched:
                self._discard(task)
                self._fail(
                    errors.IntegrityError(
                        f"{job.key}: {job.digest[0]} mismatch twice (expected {job.digest[1]}, got {got}). "
                        "The file was not placed.",
                        hint="The server or a proxy is corrupting data; try another network or endpoint.",
                    )
                )
                return
            self.progress.message(f"{job.key}: {job.digest[0]} mismatch, fetching it again from zero")
            task.refetched = True
            with task.mu:
                task.url = None
            with contextlib.suppress(FileNotFoundError):
                task.state_path.unlink()
            self._prepare(task, fresh=True)
            self._enqueue(task)
            return
        if task.lock.lost:
            self._discard(task, keep_files=True)
            self._fail(errors.LockTimeoutError(
                f"The lock on {job.key} was taken over by another process while this one was downloading it "
                "(this process was silent for too long); nothing was placed.",
                hint="Re-run `qtk pull`: it waits for the other process, then resumes.",
            ))
            return
        with task.mu:
            task.finished = True
        os.fsync(task.fd)  # the verified bytes are on disk before the rename makes them the blob
        os.close(task.fd)
        task.fd = -1
        job.on_complete(job.part_path)  # atomic move into place (the target fsyncs the directory)
        with contextlib.suppress(FileNotFoundError):
            task.state_path.unlink()
        task.lock.release()
        self.progress.file_finished(job.key)
        with self._stats_mu:
            self.stats.files_fetched += 1
        with self._all_done:
            self._pending_files -= 1
            self._all_done.notify_all()

    # ------------------------------------------------------------- lifecycle

    def _fail(self, exc: BaseException) -> None:
        with self._all_done:
            if self._error is None:
                self._error = exc
            self._stop.set()
            self._all_done.notify_all()

    def _wait_until_done(self) -> None:
        last_flush = last_sync = time.monotonic()
        with self._all_done:
            while self._pending_files > 0 and not self._stop.is_set():
                self._all_done.wait(timeout=0.1)
                now = time.monotonic()
                if now - last_flush >= STATE_FLUSH_S:
                    sync = now - last_sync >= STATE_SYNC_S
                    self._all_done.release()
                    try:
                        for t in list(self._tasks):
                            self._flush_state(t, sync=sync)
                    finally:
                        self._all_done.acquire()
                    last_flush = now
                    last_sync = now if sync else last_sync

    def _shutdown(self, workers: list[threading.Thread], hasher: threading.Thread) -> None:
        if self._stop.is_set():
            with contextlib.suppress(queue.Empty):
                while True:
                    self._work.get_nowait()
        for _ in workers:
            self._work.put(None)
        deadline = time.monotonic() + 5.0
        for t in workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._hash_q.put(None)
        hasher.join(timeout=max(0.5, deadline - time.monotonic()))
        stuck = any(t.is_alive() for t in workers) or hasher.is_alive()
        for task in self._tasks:
            if not task.finished:
                self._flush_state(task, sync=True)  # keep what was finished for the next run
                if not stuck:  # a thread blocked in a read may still write to this fd
                    self._close(task)

    def _discard(self, task: _FileTask, *, keep_files: bool = False) -> None:
        """Drop a file that failed verification twice: nothing of it stays behind (``keep_files``:
        leave the part file to the process that holds its lock now)."""
        with task.mu:
            task.finished = True
        self._close(task)
        for p in () if keep_files else (task.job.part_path, task.state_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    @staticmethod
    def _close(task: _FileTask) -> None:
        task.unmap()
        if task.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(task.fd)
            task.fd = -1
        task.lock.release()
