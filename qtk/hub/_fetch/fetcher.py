"""The fetcher: many files over one pool of connections, each locked, resumable, hashed and then placed.

:class:`Fetcher` wires the parts together and owns each file's life: lock it (another process may hold it),
plan its ranges from what an earlier run recorded (:mod:`.ranges`, :mod:`.state`), queue them for the
workers (:mod:`.workers`), and when the hasher (:mod:`.hasher`) has the digest, place the file or fetch it
again from zero once (a mismatch), then fail. The main thread meanwhile flushes the state files
(:class:`~.state.StateFlusher`) until every file is placed or one error stops the pull.

Threads: ``_tasks``, ``_pending`` and ``_error`` are read and written under ``_cv``; the counters, the
flusher, the session and each task guard their own fields; everything else is set in ``__init__`` (or, for
``_hasher`` and ``_workers``, in :meth:`Fetcher.fetch_all` before any thread starts) and only read after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time

from ... import errors
from .._lock import Locker, LockWaitTimeout
from .._rate import MinRate
from .._retry import RetryPolicy
from . import ranges, state
from .hasher import Hasher
from .job import Counters, FetchJob, FetchStats, NullProgress, ProgressSink
from .resolver import URLResolver
from .session import Session
from .task import FileTask
from .workers import READ_SIZE, Shared, Workers

__all__ = ["Fetcher", "DEFAULT_CONNECTIONS"]

DEFAULT_CONNECTIONS = 16
SHUTDOWN_S = 5.0  # how long threads get to end when the pull is over


class Fetcher:
    """Download many files over a shared pool of keep-alive connections.

    ``connections`` worker threads each take the next range of any file, so one big file gets all
    connections and many small files proceed side by side. ``chunk_size`` fixes the range size (default:
    sized per file from its size and the connections, see :func:`~.ranges.chunk_size_for`).
    """

    def __init__(self, *, token: str | None, endpoint: str, connections: int = DEFAULT_CONNECTIONS,
                 chunk_size: int | None = None, progress: ProgressSink | None = None, user_agent: str = "qtk",
                 timeout: tuple[float, float] | None = None, lock_timeout: float | None = None,
                 policy: RetryPolicy | None = None) -> None:
        if connections < 1:
            raise errors.UsageError(f"--connections must be >= 1 (got {connections}).")
        self.connections = connections
        self.chunk_size = max(chunk_size, READ_SIZE) if chunk_size else None  # None: per file
        self.progress = progress or NullProgress()
        self.policy = policy or RetryPolicy.from_env()
        if timeout is None:
            timeout = (self.policy.connect_timeout, self.policy.download_read_timeout)
        self.lock_timeout = lock_timeout
        self.min_rate = MinRate.from_env()
        self._stop = threading.Event()
        self._counters = Counters()
        self._session = Session(token=token, endpoint=endpoint, user_agent=user_agent, connections=connections,
                                timeout=timeout, min_rate=self.min_rate, stop=self._stop)
        self._flusher = state.StateFlusher()
        self._locker = Locker()
        self._cv = threading.Condition()
        self._tasks: list[FileTask] = []
        self._pending = 0
        self._error: BaseException | None = None
        self._hasher: Hasher | None = None
        self._workers: Workers | None = None

    @property
    def stats(self) -> FetchStats:
        return self._counters.snapshot()

    def fetch_all(self, jobs: list[FetchJob]) -> FetchStats:
        """Fetch ``jobs``; returns when all are verified and placed, raises the first fatal error."""
        t0 = time.monotonic()
        self._hasher = Hasher(on_complete=self._finish, fail=self._fail)
        self._workers = Workers(self.connections, self._shared())
        self._workers.start()
        self._hasher.start()
        try:
            self._open_all(jobs)
            self._wait_until_done()
        except BaseException:
            self._stop.set()
            raise
        finally:
            try:
                self._shutdown()
            finally:
                self._locker.close()
        with self._cv:
            error = self._error
        if error is not None:
            raise error
        return self._counters.snapshot(wall_s=time.monotonic() - t0)

    def _shared(self) -> Shared:
        return Shared(
            session=self._session, stop=self._stop, counters=self._counters, progress=self.progress,
            policy=self.policy, min_rate=self.min_rate, to_hash=lambda task: self._hasher.submit(task),
            after_write=lambda: self._flusher.periodic(self._task_list, may_sync=False),
            fail=self._fail, disk_full=self._disk_full,
        )

    def _task_list(self) -> list[FileTask]:
        with self._cv:
            return list(self._tasks)

    # ------------------------------------------------------------------ opening files

    def _open_all(self, jobs: list[FetchJob]) -> None:
        waiting = [job for job in jobs if not self._open(job, blocking=False)]
        for job in waiting:  # held by another process: wait for it (flushing our own state), then maybe skip
            if self._stop.is_set():
                break
            self.progress.message(f"waiting for another process to finish {job.key} ...")
            self._open(job, blocking=True)

    def _open(self, job: FetchJob, *, blocking: bool) -> bool:
        """Lock and prepare ``job``'s part file and queue its missing ranges. False if the lock is busy."""
        if not blocking:
            lock = self._locker.try_acquire(job.lock_path)  # released when the file is placed or dropped
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
            self._counters.add("files_skipped")
            return True
        urls = URLResolver(job.key, lambda version: self._session.resolve(job, version), stop=self._stop,
                           backoff=self.policy.backoff, on_resolve=lambda: self._counters.add("resolves"))
        task = FileTask(job, lock, urls)
        try:
            self._prepare(task)
        except BaseException:
            self._close(task)
            raise
        with self._cv:
            self._tasks.append(task)
            self._pending += 1
        self._enqueue(task)
        return True

    def _tick_while_waiting(self) -> bool:
        """Between tries for another process's lock: keep our own resume state current."""
        self._flusher.periodic(self._task_list, may_sync=True)
        return not self._stop.is_set()

    def _prepare(self, task: FileTask, *, fresh: bool = False) -> None:
        """Plan ``task``'s ranges on its part file, keeping what an earlier run recorded (unless ``fresh``)."""
        job, size = task.job, task.size
        job.part_path.parent.mkdir(parents=True, exist_ok=True)
        found = None if fresh else state.recorded(job.part_path, size, job.digest)
        recorded_chunk, spans = found or (None, [])
        fd = task.open_part()
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, 0)
            spans = []
            if size:
                self._preallocate(task, fd)
        if task.is_single():
            chunk = max(size, 1)
        else:
            chunk = ranges.choose_chunk(size, self.connections, self.chunk_size, spans, recorded_chunk)
        layout = ranges.plan(size, chunk, spans)
        task.start_generation(layout)
        resumed = layout.covered()
        self._counters.add("bytes_resumed", resumed)
        self.progress.file_started(job.key, job.key, size, resumed)
        self._flusher.flush(task)  # the state file exists before the first byte (a full disk can rewrite it)

    def _preallocate(self, task: FileTask, fd: int) -> None:
        """Reserve the file's blocks now, so a full disk shows up before any byte moves."""
        try:
            os.posix_fallocate(fd, 0, task.size)
        except OSError as exc:
            if exc.errno in state.DISK_FULL:
                raise self._disk_full(task, exc) from None
            os.ftruncate(fd, task.size)  # no preallocation on this filesystem: a sparse file
        except AttributeError:  # pragma: no cover - platforms without posix_fallocate
            os.ftruncate(fd, task.size)

    def _disk_full(self, task: FileTask, exc: OSError) -> errors.DiskSpaceError:
        where = task.job.part_path.parent
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = -1
        tasks = self._task_list()
        left = sum(t.remaining() for t in tasks) + (0 if task in tasks else task.remaining())
        return errors.DiskSpaceError(
            f"The disk holding {where} is full ({os.strerror(exc.errno)}): {task.job.key} has {task.covered()} of "
            f"{task.size} bytes written; this pull still needs {left} bytes, {max(free, 0)} bytes are free.",
            hint="Free some space and re-run the same command: the partial download is kept and resumes.",
        )

    def _enqueue(self, task: FileTask) -> None:
        gen, pending = task.pending()
        if not pending:
            self._hasher.submit(task)  # nothing to download: verify what is there
            return
        self._hasher.submit(task)  # what an earlier run wrote can be hashed meanwhile
        for i in pending:
            self._workers.put(task, i, gen)

    # ------------------------------------------------------------------ a file hashed completely

    def _finish(self, task: FileTask) -> None:
        """On the hasher thread: place the file if its digest matches, else fetch it again (once) or fail."""
        job = task.job
        got = task.hexdigest()
        if got != job.digest[1].lower():
            self._mismatch(task, got)
            return
        if task.lock.lost:
            self._discard(task, keep_files=True)
            self._fail(errors.LockTimeoutError(
                f"The lock on {job.key} was taken over by another process while this one was downloading it "
                "(this process was silent for too long); nothing was placed.",
                hint="Re-run `qtk pull`: it waits for the other process, then resumes.",
            ))
            return
        with self._flusher.exclusive():  # no state file is written for it from here on
            task.set_finished()
        fd = task.close_part()
        try:
            os.fsync(fd)  # the verified bytes are on disk before the rename makes them the blob
        finally:
            os.close(fd)
        job.on_complete(job.part_path)  # atomic move into place (the target fsyncs the directory)
        with contextlib.suppress(FileNotFoundError):
            task.state_path.unlink()
        task.lock.release()
        self.progress.file_finished(job.key)
        self._counters.add("files_fetched")
        with self._cv:
            self._pending -= 1
            self._cv.notify_all()

    def _mismatch(self, task: FileTask, got: str) -> None:
        job = task.job
        self._counters.add("refetches")
        if not task.mark_refetch():
            self._discard(task)
            self._fail(errors.IntegrityError(
                f"{job.key}: {job.digest[0]} mismatch twice (expected {job.digest[1]}, got {got}). "
                "The file was not placed.",
                hint="The server or a proxy is corrupting data; try another network or endpoint.",
            ))
            return
        self.progress.message(f"{job.key}: {job.digest[0]} mismatch, fetching it again from zero")
        task.urls.forget()  # resolved again on the endpoint, with the token
        with self._flusher.exclusive(), contextlib.suppress(FileNotFoundError):
            task.state_path.unlink()
        self._prepare(task, fresh=True)
        self._enqueue(task)

    # ------------------------------------------------------------------ the end

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            if self._error is None:
                self._error = exc
            self._stop.set()
            self._cv.notify_all()

    def _wait_until_done(self) -> None:
        while True:
            with self._cv:
                if self._pending <= 0 or self._stop.is_set():
                    return
                self._cv.wait(timeout=state.STATE_FLUSH_S)  # the flush period bounds what a kill -9 loses
            self._flusher.periodic(self._task_list, may_sync=True)

    def _shutdown(self) -> None:
        self._session.interrupt()  # reads still in flight (the pull failed or was stopped) return now
        deadline = time.monotonic() + SHUTDOWN_S
        workers_ended = self._workers.stop(SHUTDOWN_S, drop_queued=self._stop.is_set())
        hasher_ended = self._hasher.stop(max(0.5, deadline - time.monotonic()))
        stuck = not (workers_ended and hasher_ended)
        if not stuck:
            self._hasher.release_all()
        for task in self._task_list():
            if not task.is_finished():
                self._flusher.flush(task, sync=True)  # keep what was finished for the next run
                if not stuck:  # a thread blocked in a read may still write to this fd
                    self._close(task)
        self._session.close()

    def _discard(self, task: FileTask, *, keep_files: bool = False) -> None:
        """Drop a file that failed verification twice: nothing of it stays behind (``keep_files``:
        leave the part file to the process that holds its lock now)."""
        with self._flusher.exclusive():
            task.set_finished()
        self._close(task)
        for p in () if keep_files else (task.job.part_path, task.state_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _close(self, task: FileTask) -> None:
        if self._hasher is not None:
            self._hasher.release(task)
        fd = task.close_part()
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        task.lock.release()
