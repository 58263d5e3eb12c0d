"""qtk/hub/_fetch/state.py: the part file's sidecar state (round trip, refusal of what it did not write,
the full-disk rewrite, and the one writer's cadence)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qtk.hub._fetch import state
from qtk.hub._fetch.ranges import merge
from qtk.hub._fetch.state import Progress, StateFlusher, encode, recorded, resumable_bytes, state_path

MiB = 1024 * 1024
DIGEST = ("sha256", "ab" * 32)
SIZE = 10 * MiB + 17


def _part(tmp_path: Path, text: str | bytes | None) -> Path:
    part = tmp_path / "f.qtk-part"
    part.write_bytes(b"")
    if text is not None:
        sp = state_path(part)
        sp.write_bytes(text if isinstance(text, bytes) else text.encode())
    return part


@pytest.mark.parametrize("chunk", [MiB, 2 * MiB, 3 * MiB + 64 * 1024])
def test_round_trip(tmp_path, chunk):
    n = -(-SIZE // chunk)
    now = Progress(done=(0, 2, n - 1), partial={1: 12345, 3: 1})
    part = _part(tmp_path, None)
    state.write(state_path(part), encode(SIZE, DIGEST, chunk, now, None))
    got_chunk, spans = recorded(part, SIZE, DIGEST)
    assert got_chunk == chunk
    expect = merge([(0, chunk), (2 * chunk, 3 * chunk), ((n - 1) * chunk, SIZE), (chunk, chunk + 12345),
                    (3 * chunk, 3 * chunk + 1)])
    assert spans == expect
    assert resumable_bytes(part, SIZE, DIGEST) == sum(e - s for s, e in expect)


def test_after_a_reboot_only_durable_progress_counts(tmp_path, monkeypatch):
    part = _part(tmp_path, None)
    now, durable = Progress((0, 1, 2), {3: 100}), Progress((0,), {1: 7})
    state.write(state_path(part), encode(SIZE, DIGEST, MiB, now, durable))
    assert resumable_bytes(part, SIZE, DIGEST) == 3 * MiB + 100
    monkeypatch.setattr(state, "boot_id", lambda: "another-boot")
    assert resumable_bytes(part, SIZE, DIGEST) == MiB + 7


GOOD = {"version": 1, "size": SIZE, "digest": list(DIGEST), "chunk_size": MiB, "boot_id": None, "done": [0],
        "partial": {}}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe not utf-8",
        b"{not json",
        b'{"version": 1, "size": ',  # torn
        b"[1, 2, 3]",
        b"null",
        b"1e999999",
        json.dumps({**GOOD, "version": 2}).encode(),
        json.dumps({**GOOD, "version": "1"}).encode(),
        json.dumps({**GOOD, "size": SIZE + 1}).encode(),
        json.dumps({**GOOD, "size": float(SIZE) + 0.5}).encode(),
        json.dumps({**GOOD, "digest": ["sha256", "cd" * 32]}).encode(),
        json.dumps({**GOOD, "digest": "sha256"}).encode(),
        json.dumps({**GOOD, "chunk_size": 0}).encode(),
        json.dumps({**GOOD, "chunk_size": -MiB}).encode(),
        json.dumps({**GOOD, "chunk_size": "1048576"}).encode(),
        json.dumps({**GOOD, "chunk_size": None}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "chunk_size"}).encode(),
    ],
)
def test_a_state_it_did_not_write_for_this_file_is_refused(tmp_path, monkeypatch, content):
    monkeypatch.setattr(state, "boot_id", lambda: None)
    part = _part(tmp_path, content)
    assert state.read(part, SIZE, DIGEST) is None
    assert recorded(part, SIZE, DIGEST) is None
    assert resumable_bytes(part, SIZE, DIGEST) == 0


def test_a_state_without_its_part_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "boot_id", lambda: None)
    part = _part(tmp_path, json.dumps(GOOD))
    assert resumable_bytes(part, SIZE, DIGEST) == MiB
    part.unlink()
    assert resumable_bytes(part, SIZE, DIGEST) == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(done=json_values, partial=json_values, chunk=st.integers(1, 4 * MiB), extra=json_values)
def test_any_done_and_partial_never_claim_bytes_outside_the_file(tmp_path, monkeypatch, done, partial, chunk, extra):
    monkeypatch.setattr(state, "boot_id", lambda: None)
    doc = {**GOOD, "chunk_size": chunk, "done": done, "partial": partial, "x": extra}
    part = _part(tmp_path, json.dumps(doc))
    found = recorded(part, SIZE, DIGEST)
    assert found is not None
    spans = found[1]
    assert all(0 <= s < e <= SIZE for s, e in spans)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    assert resumable_bytes(part, SIZE, DIGEST) <= SIZE


def test_a_full_disk_rewrites_the_state_in_its_own_blocks(tmp_path, monkeypatch):
    path = tmp_path / "x.state.json"
    state.write(path, encode(SIZE, DIGEST, MiB, Progress((0,), {}), None))
    blocks = path.stat().st_blocks

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state, "write_atomic", full)
    state.write(path, encode(SIZE, DIGEST, MiB, Progress((0, 1, 2), {3: 5}), None))
    assert json.loads(path.read_text())["done"] == [0, 1, 2]  # rewritten in place
    assert path.stat().st_blocks == blocks and not (tmp_path / "x.state.json.tmp").exists()
    huge = Progress(tuple(range(3000)), {})  # more than the blocks it has: the old state stays whole
    state.write(path, encode(SIZE, DIGEST, MiB, huge, None))
    assert json.loads(path.read_text())["done"] == [0, 1, 2]


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(state, "write_atomic", denied)
    with pytest.raises(PermissionError):
        state.write(tmp_path / "x.state.json", "{}")


# ------------------------------------------------------------------------------ the one writer


class FakeTask:
    def __init__(self, tmp_path: Path, name: str = "t") -> None:
        self.size, self.digest = SIZE, DIGEST
        self.state_path = tmp_path / f"{name}.state.json"
        self.fd = -1
        self.progress = Progress((0,), {})
        self.dirty = True
        self.durable: Progress | None = None
        self.lost = False
        self.writes = 0

    def may_write_state(self):
        return not self.lost

    def take_progress(self, sync):
        if not (self.dirty or sync and self.durable != self.progress):
            return None
        self.dirty = False
        self.writes += 1
        return self.progress, self.durable, self.fd, MiB

    def set_durable(self, p):
        self.durable = p


@pytest.fixture
def clock():
    class Clock:
        t = 1000.0

        def __call__(self):
            return self.t

    return Clock()


def test_periodic_flushes_at_most_every_flush_period(tmp_path, clock):
    t = FakeTask(tmp_path)
    f = StateFlusher(clock=clock)
    f.periodic(lambda: [t], may_sync=False)
    assert t.writes == 0  # not yet: the period starts with the flusher
    clock.t += state.STATE_FLUSH_S * 1.01
    f.periodic(lambda: [t], may_sync=False)
    assert t.writes == 1 and json.loads(t.state_path.read_text())["done"] == [0]
    t.dirty = True
    clock.t += state.STATE_FLUSH_S / 2
    f.periodic(lambda: [t], may_sync=False)
    assert t.writes == 1
    clock.t += state.STATE_FLUSH_S * 0.51
    f.periodic(lambda: [t], may_sync=False)
    assert t.writes == 2


def test_durable_progress_is_recorded_by_the_main_thread_every_sync_period(tmp_path, clock):
    t = FakeTask(tmp_path)
    fh = open(tmp_path / "part", "wb")  # noqa: SIM115
    t.fd = fh.fileno()
    f = StateFlusher(clock=clock)
    for _ in range(int(state.STATE_SYNC_S / state.STATE_FLUSH_S) + 2):  # workers flush often, never durable
        clock.t += state.STATE_FLUSH_S * 1.01
        t.dirty = True
        f.periodic(lambda: [t], may_sync=False)
    assert t.durable is None
    f.periodic(lambda: [t], may_sync=True)  # the main thread: durable although a worker flushed just now
    assert t.durable == t.progress
    assert json.loads(t.state_path.read_text())["durable_done"] == [0]
    fh.close()


def test_no_state_is_written_by_a_holder_whose_lock_was_taken_over(tmp_path, clock):
    t = FakeTask(tmp_path)
    t.lost = True
    StateFlusher(clock=clock).flush(t, sync=True)
    assert t.writes == 0 and not t.state_path.exists()


def test_periodic_never_waits_for_another_flush(tmp_path, clock):
    import threading

    t = FakeTask(tmp_path)
    f = StateFlusher(clock=clock)
    clock.t += 1
    with f.exclusive():
        done = threading.Event()
        threading.Thread(target=lambda: (f.periodic(lambda: [t], may_sync=False), done.set())).start()
        assert done.wait(5)  # returned at once, without writing
    assert t.writes == 0
