"""qtk/hub/_fetch/hasher.py and task.py: a file is hashed in file order, following its written prefix while
ranges land in any order, and the digest always covers the bytes on disk."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qtk.hub._errors import HubContext
from qtk.hub._fetch import task as task_mod
from qtk.hub._fetch.hasher import Hasher, new_hasher
from qtk.hub._fetch.job import FetchJob
from qtk.hub._fetch.ranges import plan
from qtk.hub._fetch.task import HASH_STEP, FileTask, Stale

KiB = 1024


class Recorder:
    """A sha256 that remembers every update (to check the order bytes were hashed in)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.taken = bytearray()

    def update(self, data) -> None:
        self.h.update(data)
        self.taken += bytes(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


@pytest.fixture
def recording(monkeypatch):
    made: list[Recorder] = []

    def factory(digest, size):
        made.append(Recorder())
        return made[-1]

    monkeypatch.setattr(task_mod, "new_hasher", factory)
    return made


def _task(tmp_path, content: bytes, chunk: int) -> FileTask:
    part = tmp_path / "f.qtk-part"
    job = FetchJob(key="f", url="http://x/f", size=len(content), digest=("sha256", hashlib.sha256(content).hexdigest()),
                   part_path=part, lock_path=tmp_path / "f.lock", ctx=HubContext("http://x", "a/b", "0" * 40),
                   on_complete=lambda p: None)
    t = FileTask(job, SimpleNamespace(lost=False, release=lambda: None), urls=None)
    fd = t.open_part()
    os.ftruncate(fd, len(content))
    t.start_generation(plan(len(content), chunk, []))
    return t


def _write(t: FileTask, content: bytes, i: int, upto: int, gen: int | None = None) -> None:
    """Write range ``i`` of ``t`` up to file offset ``upto`` (as a worker does), completing it at its end."""
    gen = t.gen if gen is None else gen
    start, end, pos, fd = t.begin_range(i, gen)
    try:
        os.pwrite(fd, content[pos:upto], pos)
        t.wrote(i, gen, upto)
        if upto >= end:
            t.range_done(i, gen, threading.Event())
    finally:
        t.end_range(gen)


def _prefix_written(t: FileTask) -> int:
    """The contiguous written prefix of the file, computed independently of the hasher."""
    end = 0
    for i, (s, e) in enumerate(t.ranges):
        if i in t.done:
            end = e
            continue
        return s + t.partial.get(i, 0)
    return end


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 300 * KiB), chunk_k=st.sampled_from([16, 64, 100]), seed=st.integers(0, 2**32),
       pieces=st.integers(1, 4))
def test_any_write_order_is_hashed_in_file_order(tmp_path_factory, monkeypatch, size, chunk_k, seed, pieces):
    made: list[Recorder] = []
    monkeypatch.setattr(task_mod, "new_hasher", lambda d, n: made.append(Recorder()) or made[-1])
    rng = random.Random(seed)
    content = rng.randbytes(size)
    t = _task(tmp_path_factory.mktemp("h"), content, chunk_k * KiB)
    # each range is written in ``pieces`` steps, its own steps in order; the ranges interleave at random
    steps = {i: sorted(rng.sample(range(s + 1, e + 1), min(pieces, e - s)) + [e]) for i, (s, e) in enumerate(t.ranges)}
    order = [i for i, ups in steps.items() for _ in set(ups)]
    rng.shuffle(order)
    completed = []
    hasher = Hasher(on_complete=completed.append, fail=lambda exc: pytest.fail(repr(exc)))
    for i in order:
        _write(t, content, i, steps[i].pop(0))
        hasher.advance(t)
        rec = made[-1]
        assert bytes(rec.taken) == content[: len(rec.taken)]  # in file order, nothing skipped
        assert t.hash_pos == len(rec.taken) == _prefix_written(t)  # it follows the written prefix
    assert completed == [t] and t.hexdigest() == t.job.digest[1]
    hasher.release_all()


def test_hashing_starts_before_the_first_range_is_complete(tmp_path, recording):
    content = random.Random(1).randbytes(3 * 1024 * KiB)
    t = _task(tmp_path, content, 1024 * KiB)
    hasher = Hasher(on_complete=lambda t: None, fail=pytest.fail)
    _write(t, content, 2, 3 * 1024 * KiB)  # the last range: nothing before it is written
    hasher.advance(t)
    assert t.hash_pos == 0
    _write(t, content, 0, 300 * KiB)  # the head of the first range
    hasher.advance(t)
    assert t.hash_pos == 300 * KiB and bytes(recording[-1].taken) == content[: 300 * KiB]
    hasher.release_all()


def test_a_range_written_again_from_its_start_is_hashed_again(tmp_path, recording):
    good = random.Random(2).randbytes(512 * KiB)
    bad = bytes(len(good))
    t = _task(tmp_path, good, 512 * KiB)
    completed = []
    hasher = Hasher(on_complete=completed.append, fail=pytest.fail)
    _write(t, bad, 0, 200 * KiB)  # a first answer, hashed as it lands
    hasher.advance(t)
    assert t.hash_pos == 200 * KiB
    t.restart_range(0, t.gen)  # a whole-file answer to the resumed request: the body starts at byte 0 again
    assert t.hash_pos == 0
    _write(t, good, 0, 512 * KiB)
    hasher.advance(t)
    assert completed == [t] and t.hexdigest() == hashlib.sha256(good).hexdigest()
    assert bytes(recording[-1].taken) == good


def test_while_writers_of_an_older_layout_remain_only_complete_ranges_are_hashed(tmp_path, recording):
    content = random.Random(3).randbytes(256 * KiB)
    t = _task(tmp_path, content, 64 * KiB)
    old = t.gen
    t.begin_range(1, old)  # a worker of the old layout is still writing
    new = t.replan_single(old)
    assert new == old + 1 and t.ranges == ((0, len(content)),)
    _write(t, content, 0, 100 * KiB, gen=new)
    assert t.hashable() is None  # the old writer may still change those bytes
    with pytest.raises(Stale):
        t.wrote(1, old, 128 * KiB)
    t.end_range(old)
    got = t.hashable()
    assert got is not None and got[1:3] == (0, 100 * KiB)


def test_the_hasher_is_told_every_hash_step_of_the_range_it_waits_for(tmp_path):
    size = 4 * HASH_STEP
    t = _task(tmp_path, bytes(size), 2 * HASH_STEP)
    g = t.gen
    assert not t.wrote(1, g, 2 * HASH_STEP + HASH_STEP)  # not the range holding the hashing position
    assert not t.wrote(0, g, HASH_STEP // 2)
    assert t.wrote(0, g, HASH_STEP)
    assert not t.wrote(0, g, HASH_STEP + 1)  # told already; not a step more yet
    assert t.wrote(0, g, 2 * HASH_STEP)


def test_the_thread_places_each_file_once_with_the_right_digest(tmp_path):
    content = random.Random(4).randbytes(1024 * KiB + 3)
    t = _task(tmp_path, content, 128 * KiB)
    done = threading.Event()
    placed = []
    hasher = Hasher(on_complete=lambda task: (placed.append(task), done.set()), fail=pytest.fail)
    hasher.start()
    order = list(range(len(t.ranges)))
    random.Random(5).shuffle(order)
    for i in order:
        _write(t, content, i, t.ranges[i][1])
        hasher.submit(t)
        hasher.submit(t)  # told twice: harmless
    assert done.wait(10)
    assert hasher.stop(5)
    assert placed == [t] and t.hexdigest() == hashlib.sha256(content).hexdigest()


def test_an_empty_file_completes_at_once(tmp_path):
    t = _task(tmp_path, b"", 2 * 1024 * KiB)
    placed = []
    Hasher(on_complete=placed.append, fail=pytest.fail).advance(t)
    assert placed == [t] and t.hexdigest() == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("data", [b"", b"hello\n", bytes(range(256)) * 10])
def test_git_blob_sha1_is_gits(data):
    h = new_hasher(("git-sha1", "x"), len(data))
    h.update(data)
    assert h.hexdigest() == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    if data == b"hello\n":
        assert h.hexdigest() == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


def test_an_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="md5"):
        new_hasher(("md5", "x"), 1)


# ------------------------------------------------------------------------ flow control and writeback


def test_a_worker_far_ahead_of_the_hasher_waits_until_it_catches_up(tmp_path):
    content = random.Random(6).randbytes(1024 * KiB)
    t = _task(tmp_path, content, 256 * KiB)
    for i in range(3):
        _write(t, content, i, t.ranges[i][1])  # 768 KiB ready to hash
    assert t.hash_lag() == 768 * KiB
    told = []
    hasher = Hasher(on_complete=lambda task: None, fail=pytest.fail)
    done = threading.Event()
    threading.Thread(target=lambda: (t.wait_for_hasher(100 * KiB, threading.Event(), lambda: told.append(1)),
                                     done.set()), daemon=True).start()
    assert not done.wait(0.3)  # waits: 768 KiB > 100 KiB
    assert told  # and woke the hasher first
    hasher.advance(t)
    assert done.wait(5) and t.hash_lag() == 0
    hasher.release_all()


def test_bytes_beyond_a_gap_never_make_a_worker_wait(tmp_path):
    """Ranges written after one that is still missing cannot be hashed yet: waiting for them would stall."""
    content = random.Random(7).randbytes(1024 * KiB)
    t = _task(tmp_path, content, 256 * KiB)
    for i in (1, 2, 3):
        _write(t, content, i, t.ranges[i][1])
    assert t.hash_lag() == 0
    t.wait_for_hasher(0, threading.Event(), lambda: None)  # returns at once


def test_a_stop_ends_the_wait(tmp_path):
    content = bytes(512 * KiB)
    t = _task(tmp_path, content, 256 * KiB)
    _write(t, content, 0, 256 * KiB)
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    t.wait_for_hasher(0, stop, lambda: None)
    assert stop.is_set()


def test_the_hasher_stops_feeding_a_hash_that_was_started_over(tmp_path, monkeypatch, recording):
    from qtk.hub._fetch import hasher as hasher_mod

    monkeypatch.setattr(hasher_mod, "HASH_PIECE", 64 * KiB)
    content = random.Random(8).randbytes(512 * KiB)
    t = _task(tmp_path, content, 512 * KiB)
    _write(t, content, 0, 256 * KiB)
    first = recording[-1]
    real = hasher_mod._Map.hash

    def rewind_after_first_piece(self, h, s, e):
        real(self, h, s, e)
        if h is first and s == 0:
            t.restart_range(0, t.gen)  # the range is written again meanwhile

    monkeypatch.setattr(hasher_mod._Map, "hash", rewind_after_first_piece)
    Hasher(on_complete=lambda task: None, fail=pytest.fail).advance(t)
    assert len(first.taken) == 64 * KiB  # one piece, then it noticed


def test_writeback_is_started_for_what_was_hashed(tmp_path):
    from qtk.hub._fetch import hasher as hasher_mod

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("not Linux")
    assert hasher_mod._sync_file_range() is not None  # glibc has it; without it placing waits on a full fsync
    with open(tmp_path / "f", "wb") as fh:
        fh.write(b"x" * 100_000)
        hasher_mod.start_writeback(fh.fileno(), 0, 100_000)
    hasher_mod.start_writeback(-1, 0, 1)  # a hint: errors are ignored
