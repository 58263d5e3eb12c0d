"""The minimum transfer rate per connection (issue 19 #4, qtk/hub/_rate.py).

A server that drips one byte every 1.5 s under HF_HUB_DOWNLOAD_TIMEOUT=2 used to keep a GET alive
forever (each byte resets the read timeout). Now a body slower than QTK_MIN_RATE over
QTK_MIN_RATE_WINDOW, or a response head not complete within the read timeout, cuts the connection;
the range restarts on a new one at most QTK_SLOW_RESTARTS times, then the pull stops with exit 30
naming the host. The end-to-end tests use a 2 s window; the rule itself is checked on a simulated
clock (no sleeping)."""

from __future__ import annotations

import threading
import time

import pytest

from test_pull_topology import SMALL, topo, topo_root, topo_server  # noqa: F401 (the topology fixtures)

from qtk import errors
from qtk.hub._rate import MinRate, Transfer

MiB = 1024 * 1024


# ------------------------------------------------------------------------ the rule, on a simulated clock


class Sim:
    """One watched transfer on a fake clock; the guard's check runs every ``step`` seconds of it."""

    def __init__(self, rate: MinRate, head_limit: float = 60.0, step: float = 0.05) -> None:
        self.t = 0.0
        self.step = step
        self.tr = Transfer("http://host:1", rate, head_limit, clock=lambda: self.t)
        self.cut_at: float | None = None
        self.why = ""
        self.buf = memoryview(bytearray(MiB))

    def advance(self, secs: float) -> None:
        end = self.t + secs
        while self.t < end - 1e-9 and self.cut_at is None:
            self.t = min(end, self.t + self.step)
            if (why := self.tr.verdict()) is not None:
                self.cut_at, self.why = self.t, why

    def read(self, got: int | None, secs: float) -> int:
        """One read that would return ``got`` bytes (None: all it asked for) after ``secs``; a cut ends it."""
        def readinto(view):
            self.advance(secs)
            return 0 if self.cut_at is not None else min(len(view), len(view) if got is None else got)

        return self.tr.readinto(readinto, self.buf[: self.tr.read_size(MiB)])

    def body(self) -> "Sim":
        self.tr.attach(None)
        self.tr.head_done()
        return self

    def steady(self, bytes_per_s: float, until: float) -> None:
        while self.t < until and self.cut_at is None:
            self.read(None, self.tr.read_size(MiB) / bytes_per_s)


RATE = MinRate(bytes_per_s=10_000, window_s=30, restarts=3)


@pytest.mark.parametrize("speed", [10_000, 12_000, 1e6, 50e6])
def test_a_connection_at_or_above_the_minimum_is_never_cut(speed):
    sim = Sim(RATE).body()
    sim.steady(speed, until=5 * RATE.window_s)
    assert sim.cut_at is None, sim.why


@pytest.mark.parametrize("speed", [0.5, 100, 4_000])
def test_a_connection_under_half_the_minimum_is_cut_within_the_window(speed):
    sim = Sim(RATE).body()
    sim.steady(speed, until=10 * RATE.window_s)
    assert sim.cut_at is not None and sim.cut_at <= RATE.window_s + 1, (sim.cut_at, sim.why)
    assert "under the minimum of 10,000 bytes/s over 30 s" in sim.why


def test_a_drip_whose_reads_return_every_read_timeout_is_cut():
    """The raw-socket path: recv(MSG_WAITALL) returns what trickled in when SO_RCVTIMEO (2 s) expires."""
    sim = Sim(RATE).body()
    while sim.cut_at is None and sim.t < 300:
        sim.read(1, 2.0)
    assert sim.cut_at is not None and sim.cut_at <= RATE.window_s + 2.5


def test_a_read_that_never_returns_is_cut():
    """The buffered (TLS) path: readinto waits until the whole buffer is full, however slowly it fills."""
    sim = Sim(RATE).body()
    sim.read(0, 10_000)
    assert sim.cut_at is not None and sim.cut_at <= RATE.window_s + 0.1


def test_a_fast_connection_that_turns_into_a_drip_is_cut_within_its_read_size_over_the_rate():
    sim = Sim(RATE).body()
    sim.steady(50e6, until=100)
    assert sim.tr.read_size(MiB) == MiB  # fast: full-size reads
    t0 = sim.t
    sim.read(0, 10_000)
    assert sim.cut_at is not None and sim.cut_at - t0 <= max(RATE.window_s, MiB / RATE.bytes_per_s) + 0.1


def test_time_spent_outside_reads_does_not_count_against_the_server():
    """A worker held up by a slow disk between reads: the connection is judged on its own waits only."""
    sim = Sim(RATE).body()
    sim.steady(20_000, until=60)
    sim.advance(10 * RATE.window_s)  # no read in flight
    sim.steady(20_000, until=sim.t + 60)
    assert sim.cut_at is None, sim.why


@pytest.mark.parametrize("head_s,cut", [(1.9, False), (2.1, True)])
def test_a_response_head_must_be_complete_within_the_read_timeout_in_total(head_s, cut):
    sim = Sim(RATE, head_limit=2.0)
    sim.tr.attach(None)
    sim.advance(head_s)
    assert (sim.cut_at is not None) == cut
    if cut:
        assert "no complete response head within 2 s" in sim.why


def test_a_drained_error_body_is_bounded_like_a_head():
    sim = Sim(RATE, head_limit=2.0).body()
    with sim.tr.opaque():
        sim.advance(5)
    assert sim.cut_at is not None and sim.cut_at <= 2.1


def test_min_rate_zero_turns_the_body_rule_off_but_not_the_head_rule():
    off = MinRate(bytes_per_s=0, window_s=30, restarts=3)
    sim = Sim(off).body()
    sim.read(0, 10 * 30)
    assert sim.cut_at is None
    assert sim.tr.read_size(MiB) == MiB
    sim = Sim(off, head_limit=2.0)
    sim.tr.attach(None)
    sim.advance(3)
    assert sim.cut_at is not None


# ------------------------------------------------------------------------------------------ settings


def test_defaults_and_environment(monkeypatch):
    assert MinRate.from_env() == MinRate(10_000, 30, 3)
    monkeypatch.setenv("QTK_MIN_RATE", "50000")
    monkeypatch.setenv("QTK_MIN_RATE_WINDOW", "2.5")
    monkeypatch.setenv("QTK_SLOW_RESTARTS", "0")
    assert MinRate.from_env() == MinRate(50_000, 2.5, 0)


@pytest.mark.parametrize(
    "var,value",
    [("QTK_MIN_RATE", "abc"), ("QTK_MIN_RATE", "-1"), ("QTK_MIN_RATE", "nan"), ("QTK_MIN_RATE", "inf"),
     ("QTK_MIN_RATE_WINDOW", "0"), ("QTK_MIN_RATE_WINDOW", "-3"), ("QTK_SLOW_RESTARTS", "1.5"),
     ("QTK_SLOW_RESTARTS", "-1")],
)
def test_a_bad_setting_is_a_usage_error(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(errors.UsageError, match=var):
        MinRate.from_env()


# ------------------------------------------------------------------------- end to end, a dripping server


@pytest.fixture
def fast_guard(monkeypatch):
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    monkeypatch.setenv("QTK_MIN_RATE", "10000")
    monkeypatch.setenv("QTK_MIN_RATE_WINDOW", "2")
    monkeypatch.setenv("QTK_SLOW_RESTARTS", "1")


def _pull_within(qtk, topo, deadline: float, *args):
    """Run the CLI in a thread; if it is still running at ``deadline`` (the bug), release the server so the
    thread ends, and fail."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", qtk("pull", *args)), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(deadline)
    took = time.monotonic() - t0
    if t.is_alive():
        topo.cdn.faults.drips = 0
        topo.cdn.stall_release.set()
        t.join(60)
        pytest.fail(f"the pull was still running after {deadline:.0f} s against a dripping server")
    return out["r"], took


@pytest.mark.parametrize("head", [False, True], ids=["body-drips", "head-drips"])
def test_a_dripping_server_is_cut_restarted_then_named(topo, qtk, fast_guard, head):
    topo.cdn.faults.drips = 1000
    topo.cdn.faults.drip_head = head
    r, took = _pull_within(qtk, topo, 40, "acme/cdn-small", "--connections", "1")
    assert r.exit_code == 30, r.stderr
    assert f"{topo.cdn.url} sent weights.bin too slowly on 2 connection(s) in a row" in r.stderr, r.stderr
    assert ("no complete response head within 2 s" if head else "under the minimum of 10,000 bytes/s over 2 s") \
        in r.stderr
    assert "QTK_MIN_RATE" in r.stderr
    assert took < 20, took  # two windows of 2 s (+ checks), not hours
    gets = [e for e in topo.cdn.log if e.method == "GET"]
    assert len(gets) == 2  # the first try and one restart, each on its own connection
    assert gets[0].client_port != gets[1].client_port


def test_a_slow_connection_that_recovers_finishes_the_pull(topo, qtk, topo_root, fast_guard):
    """One dripping response, then normal ones: cut, restarted, done (the restart is counted)."""
    import hashlib
    import json

    topo.cdn.faults.drips = 1
    r, _ = _pull_within(qtk, topo, 40, "acme/cdn-small", "--connections", "1", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["stats"]["slow_restarts"] == 1
    got = hashlib.sha256(open(f"{doc['path']}/weights.bin", "rb").read()).hexdigest()
    assert got == hashlib.sha256((topo_root / "acme/cdn-small/weights.bin").read_bytes()).hexdigest()


def test_a_throttled_connection_above_the_minimum_is_left_alone(topo, qtk, monkeypatch):
    monkeypatch.setenv("QTK_MIN_RATE", "200000")
    monkeypatch.setenv("QTK_MIN_RATE_WINDOW", "1")
    topo.cdn.faults.throttle_bps = 1e6  # 5 times the minimum, per connection
    r, _ = _pull_within(qtk, topo, 60, "acme/cdn-small", "--connections", "4", "--json")
    assert r.exit_code == 0, r.stderr
    import json

    assert json.loads(r.stdout)["stats"]["slow_restarts"] == 0
    assert len([e for e in topo.cdn.log if e.method == "GET"]) == -(-SMALL // (2 * MiB))  # one GET per range
