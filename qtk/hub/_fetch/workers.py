"""The worker pool: ``connections`` threads, each taking the next range of any file from one queue, so one
big file gets every connection and many small files proceed side by side.

A worker GETs its range (``Range: bytes=pos-end``, resuming where an earlier try or run stopped), reads the
body straight into its own reused buffer (:mod:`.body`) and writes each read in place with ``os.pwrite``.
Transient failures (resets, 5xx, 429, a stalled body) retry with backoff or the server's ``Retry-After``,
``MAX_ATTEMPTS`` times since the last byte of progress; a refused signed URL is resolved again
(:mod:`.resolver`); a connection slower than the minimum rate (:mod:`qtk.hub._rate`) is cut and the range
restarted on a new one. A server that answers a Range request with the whole file gets the file re-planned
as one stream (:meth:`~.task.FileTask.replan_single`).

Threads: the queue is thread-safe; everything else a worker touches belongs to the task (its lock), the
session, or the fetcher's callbacks in :class:`Shared`.
"""

from __future__ import annotations

import errno
import http.client
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import urllib3

from ... import errors
from .._errors import public_url
from .._rate import MinRate, RateGuard, SlowTransfer
from .._retry import RetryPolicy
from .body import body_readinto
from .job import Counters, ProgressSink
from .session import REDIRECT_STATUS, Expired, Retryable, Session, Stop
from .state import DISK_FULL
from .task import HASH_LAG_MAX, FileTask, Stale

__all__ = ["Shared", "Workers", "MAX_ATTEMPTS", "READ_SIZE"]

MAX_ATTEMPTS = 6  # per range, counted since the last byte of progress
READ_SIZE = 1024 * 1024  # per read: one recv_into loop and one pwrite per MiB


@dataclass(frozen=True)
class Shared:
    """What the workers share with the fetcher (each part thread-safe on its own)."""

    session: Session
    stop: threading.Event
    counters: Counters
    progress: ProgressSink
    policy: RetryPolicy
    min_rate: MinRate
    to_hash: Callable[[FileTask], None]  # the file may have new bytes to hash
    after_write: Callable[[], None]  # a chance to flush state files (kill -9 safety)
    fail: Callable[[BaseException], None]  # fatal for the whole pull
    disk_full: Callable[[FileTask, OSError], Exception]


class Workers:
    def __init__(self, n: int, shared: Shared) -> None:
        self.s = shared
        self._q: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name=f"qtk-fetch-{i}", daemon=True) for i in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def put(self, task: FileTask, i: int, gen: int) -> None:
        self._q.put((task, i, gen))

    def stop(self, timeout: float, *, drop_queued: bool) -> bool:
        """End the threads (after the queued ranges unless ``drop_queued``); True if all ended in time."""
        if drop_queued:
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
        for _ in self._threads:
            self._q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        buf = memoryview(bytearray(READ_SIZE))
        while (item := self._q.get()) is not None and not self.s.stop.is_set():
            task, i, gen = item
            try:
                self.fetch_range(task, i, gen, buf)
            except Stop:
                return
            except BaseException as exc:  # fatal for the whole pull
                self.s.fail(exc)
                return
            self.s.to_hash(task)

    # ------------------------------------------------------------------ one range, with retries

    def fetch_range(self, task: FileTask, i: int, gen: int, buf: memoryview) -> None:
        attempts = slow = 0
        expired: int | None = None  # the URL version a GET was refused with
        while True:
            if self.s.stop.is_set():
                raise Stop
            before = task.wanted(i, gen)
            if before is None:
                return  # re-planned (the new ranges are queued) or written
            try:
                if expired is not None:
                    task.urls.refused(expired)
                    expired = None
                url, version = task.urls.current()
                self._get_range(task, i, gen, buf, url, version)
            except Stale:
                return
            except Expired as exc:
                expired = exc.version
            except SlowTransfer as exc:  # cut by the rate guard: again on a new connection, a few times
                slow += 1
                self._slow_restart(task, exc, slow)
            except Retryable as exc:
                now = task.wanted(i, gen)
                attempts = 1 if now is not None and now > before else attempts + 1
                self._wait_to_retry(task, exc, attempts)

    def _slow_restart(self, task: FileTask, exc: SlowTransfer, slow: int) -> None:
        if self.s.stop.is_set():
            raise Stop
        if slow > self.s.min_rate.restarts:
            raise errors.NetworkError(
                f"{exc.where} sent {task.job.key} too slowly on {slow} connection(s) in a row: {exc.reason}.",
                hint="The server is overloaded, throttling or hostile: re-run later (finished bytes are kept and "
                "the download resumes). On a slow link, use fewer --connections or lower QTK_MIN_RATE "
                "(bytes/s per connection; 0 turns the check off).",
            )
        self.s.counters.add("slow_restarts")

    def _wait_to_retry(self, task: FileTask, exc: Retryable, attempts: int) -> None:
        if attempts >= MAX_ATTEMPTS:
            raise errors.NetworkError(
                f"Downloading {task.job.key} failed after {MAX_ATTEMPTS} attempts: {exc}",
                hint="Check the network, then re-run: finished bytes are kept and the download resumes.",
            ) from None
        self.s.counters.add("retries")
        delay = self.s.policy.delay(attempts, exc.retry_after, f"Downloading {task.job.key}")
        if exc.retry_after is not None and exc.origin is not None:
            self.s.session.hold(exc.origin, delay)
        if self.s.stop.wait(delay):
            raise Stop from None

    # ------------------------------------------------------------------ one request

    def _get_range(self, task: FileTask, i: int, gen: int, buf: memoryview, url: str, version: int) -> None:
        start, end, pos, fd = task.begin_range(i, gen)
        try:
            if pos < end:
                self._request_range(task, i, gen, buf, url, version, (start, end, pos, fd))
            task.range_done(i, gen, self.s.stop)
        finally:
            task.end_range(gen)

    def _request_range(self, task: FileTask, i: int, gen: int, buf: memoryview, url: str, version: int,
                       where: tuple[int, int, int, int]) -> None:
        """GET ``[pos, end)`` of range ``i`` (``where`` = start, end, pos, fd) and write the body in place."""
        start, end, pos, fd = where
        s = self.s
        whole = start == 0 and end == task.size
        single = task.is_single()
        headers = s.session.headers(url, None if single else {"Range": f"bytes={pos}-{end - 1}"})
        with s.session.guard.watch(public_url(url, path=False)) as watched:
            r = s.session.request("GET", url, headers, preload=False)
            try:
                task.check(gen)  # re-planned while this request was on its way
                if r.status == 206 and not single:
                    _check_content_range(task, r, pos, end)
                elif r.status == 200 and (whole or single):
                    _check_length(task, r)
                    if pos:  # the body starts at byte 0 again
                        pos = start
                        task.restart_range(i, gen)
                elif r.status == 200:
                    self._replan_single(task, gen)
                    raise Stale
                elif r.status in REDIRECT_STATUS or r.status >= 400:
                    s.session.raise_for(task.job, r, url, version)
                else:
                    raise Retryable(f"unexpected HTTP {r.status} from {public_url(url, path=False)}")
                task.urls.served(version)
                pos = self._read_body(task, r, i, gen, (pos, end, fd), buf)
            finally:
                if pos >= end:
                    r.release_conn()
                elif r.status >= 400:
                    with watched.opaque():  # an error body, dripped, must not hold the worker either
                        r.drain_conn()
                else:
                    r.close()

    def _replan_single(self, task: FileTask, gen: int) -> None:
        new_gen = task.replan_single(gen)
        if new_gen is not None:
            self.s.progress.message(
                f"{task.job.key}: the server ignores HTTP Range requests; downloading it in one stream")
            self.put(task, 0, new_gen)

    def _read_body(self, task: FileTask, r, i: int, gen: int, span: tuple[int, int, int], buf: memoryview) -> int:
        """Read the body into ``buf`` and write it at ``[pos, end)`` (``span`` = pos, end, fd); returns the
        position reached (``end``)."""
        pos, end, fd = span
        s = self.s
        readinto = body_readinto(r)
        watched = RateGuard.current()  # sizes and accounts each read (the minimum rate)
        while pos < end:
            if s.stop.is_set():
                raise Stop
            want = min(watched.read_size(READ_SIZE) if watched else READ_SIZE, end - pos)
            try:
                n = watched.readinto(readinto, buf[:want]) if watched else readinto(buf[:want])
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                raise Retryable(f"{type(exc).__name__}: {exc}") from None
            if not n:
                raise Retryable(f"connection closed after {pos} of {task.size} bytes")
            self._pwrite(task, fd, buf[:n], pos)
            pos += n
            if task.wrote(i, gen, pos):
                s.to_hash(task)
            if task.hash_lag() > HASH_LAG_MAX:  # the hasher needs the CPU more than this worker does
                task.wait_for_hasher(HASH_LAG_MAX, s.stop, lambda: s.to_hash(task))
            s.after_write()
            s.counters.add("bytes_downloaded", n)
            s.progress.advance(task.job.key, n)
        return pos

    def _pwrite(self, task: FileTask, fd: int, data: memoryview, pos: int) -> None:
        """Write all of ``data`` at ``pos``. A nearly full filesystem accepts part of a write and returns a
        short count (no error): the rest is written again, which then fails with ENOSPC, so a range is never
        counted done over a hole (on tmpfs, hashing a hole through the mmap would be a SIGBUS)."""
        try:
            while data:
                n = os.pwrite(fd, data, pos)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                data, pos = data[n:], pos + n
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise self.s.disk_full(task, exc) from None
            raise


def _check_content_range(task: FileTask, r, pos: int, end: int) -> None:
    crange = r.headers.get("Content-Range", "")
    expect = f"bytes {pos}-{end - 1}/"
    if not crange.startswith(expect):
        raise Retryable(f"unexpected Content-Range {crange!r} (wanted {expect}...)")
    total = crange.rsplit("/", 1)[-1]
    if total != "*" and total != str(task.size):
        raise _size_mismatch(task, total)


def _check_length(task: FileTask, r) -> None:
    length = r.headers.get("Content-Length")
    if length is not None and length.strip() != str(task.size):
        raise _size_mismatch(task, length)


def _size_mismatch(task: FileTask, got: str) -> errors.IntegrityError:
    return errors.IntegrityError(
        f"{task.job.key}: the server says the file has {got} bytes, the repo listing said {task.size}.",
        hint="The repo may have changed under the pinned revision; re-run `qtk pull`.",
    )
