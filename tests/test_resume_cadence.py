"""How often a GPTQ/AWQ run publishes its resume checkpoint (issue 23): by elapsed time and the checkpoints'
own cost, not after every layer. GPTQModel 7.6's per-layer checkpoint re-serializes the embeddings and
re-hashes every finished layer at each commit; written after each of SmolLM2's 30 layers it made GPTQ
~15 % slower in CPU time than GPTQModel called directly (608ce38)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtk import errors
from qtk.quantize import _cadence
from qtk.quantize._cadence import Cadence, cadence_from_env


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(cadence: Cadence, clock: FakeClock, layer_s: list[float], commit_s) -> list[int]:
    """GPTQModel 7.6's loop as ``CheckpointExtension.on_boundary`` drives it: each layer computes, then its
    boundary commits when the cadence says so, and always after the last layer. ``commit_s(k)``: what a
    commit after k layers costs. Returns the layer counts that were committed."""
    committed = []
    for k, seconds in enumerate(layer_s, start=1):
        clock.now += seconds
        if cadence.due() or k == len(layer_s):
            started = clock.now
            clock.now += commit_s(k)
            cadence.record(started, clock.now, True)
            committed.append(k)
    return committed


@pytest.mark.parametrize("value, every_layer, min_gap", [
    (None, False, 60.0), ("", False, 60.0), ("  ", False, 60.0), ("layer", True, None), ("60", False, 60.0),
    ("0", False, 0.0), ("2.5s", False, 2.5), (" 30 ", False, 30.0), (".5", False, 0.5), ("7.", False, 7.0),
])
def test_the_cadence_qtk_resume_every_asks_for(value, every_layer, min_gap):
    env = {} if value is None else {"QTK_RESUME_EVERY": value}
    cadence = cadence_from_env(env)
    assert cadence.every_layer is every_layer
    if min_gap is not None:
        assert cadence.min_gap_s == min_gap


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1m", "layer:1", "1e3", "\u0663", "10 s", "s", "1..2", "0x10",
                                   "layers", "60ss", "+5", "9" * 12, "1\x00"])
def test_a_cadence_qtk_cannot_read_is_refused_with_a_hint(value):
    with pytest.raises(errors.UsageError) as info:
        cadence_from_env({"QTK_RESUME_EVERY": value})
    assert "QTK_RESUME_EVERY" in str(info.value) and "layer" in info.value.hint


@given(st.text(max_size=20))
def test_any_value_is_a_cadence_or_a_usage_error(value):
    try:
        cadence = cadence_from_env({"QTK_RESUME_EVERY": value})
    except errors.UsageError:
        return
    assert cadence.every_layer or 0 <= cadence.min_gap_s < 1e9


def test_default_on_a_short_run_writes_only_the_last_checkpoint():
    """SmolLM2-135M on 2 CPU cores: 30 layers of ~2 s, a commit ~0.1 s + 0.02 s per finished layer. Before,
    30 commits (one per layer); now the run's last one, unless a minute has passed."""
    clock = FakeClock()
    assert simulate(Cadence(clock=clock), clock, [2.0] * 30, lambda k: 0.1 + 0.02 * k) == [30]
    clock = FakeClock()
    assert simulate(Cadence(every_layer=True, clock=clock), clock, [2.0] * 30, lambda k: 0.1) == list(range(1, 31))


def test_checkpoints_are_a_minute_apart_and_at_most_5_percent_of_a_long_run():
    """A long run (80 layers of 30 s) whose commits grow with depth to 3 minutes (re-hashing every finished
    layer): at least 60 s and 19 commit-times between checkpoints, so the commits before the last two take
    <= 5 % of the run."""
    clock = FakeClock()
    cost = lambda k: 2.0 + 2.2 * k  # noqa: E731
    done = simulate(Cadence(clock=clock), clock, [30.0] * 80, cost)
    assert done[0] == 2 and done[-1] == 80  # the first after 60 s
    gaps = [30.0 * (b - a) for a, b in zip(done, done[1:])]  # layers computed between two commits
    assert all(gap >= max(60.0, 19 * cost(a)) - 1e-9 for a, gap in zip(done[:-2], gaps[:-1]))
    assert sum(cost(k) for k in done[:-2]) <= 0.05 * (30.0 * 80 + sum(cost(k) for k in done))
    assert len(done) < 20  # 80 before


@given(layer_s=st.lists(st.floats(0.01, 600), min_size=1, max_size=120),
       costs=st.lists(st.floats(0.0, 300), min_size=120, max_size=120),
       min_gap=st.sampled_from([0.0, 5.0, 60.0]))
def test_commits_before_the_last_two_take_at_most_5_percent(layer_s, costs, min_gap):
    clock = FakeClock()
    cadence = Cadence(min_gap_s=min_gap, clock=clock)
    done = simulate(cadence, clock, layer_s, lambda k: costs[k - 1])
    total = sum(layer_s) + sum(costs[k - 1] for k in done)
    assert done[-1] == len(layer_s) and cadence.written == len(done)
    assert sum(costs[k - 1] for k in done[:-2]) <= 0.05 * total + 1e-6


def test_gptqmodel_asks_the_cadence_at_each_boundary():
    """The config qtk passes GPTQModel answers 1 (a checkpoint is due) or an interval no run reaches."""
    pytest.importorskip("gptqmodel")
    clock = FakeClock()
    cadence = Cadence(min_gap_s=10, clock=clock)
    cfg, timed, why_not = _cadence.cadenced_config("/nonexistent/ckpt", cadence)
    assert why_not is None
    assert cfg.interval_layers > 10**9
    clock.now += 10
    assert cfg.interval_layers == 1
    cadence.record(clock.now, clock.now + 1, True)  # a 1 s commit: the next is due 19 s after it
    clock.now += 1 + 18
    assert cfg.interval_layers > 10**9
    clock.now += 1
    assert cfg.interval_layers == 1


def test_on_other_gptqmodel_code_every_layer_checkpoints_and_provenance_says_why(monkeypatch):
    pytest.importorskip("gptqmodel")
    monkeypatch.setattr(_cadence, "_ON_BOUNDARY_SHA256", "0" * 64)
    cadence = Cadence()
    cfg, _, why_not = _cadence.cadenced_config("/nonexistent/ckpt", cadence)
    assert cfg.interval_layers == 1 and "on_boundary" in why_not
    assert cadence.summary(why_not) == {"every": "after every layer (GPTQModel's default)", "why": why_not}


_COUNT_COMMITS = textwrap.dedent("""
    import json, os, sys
    from gptqmodel.looper.checkpoint_store import CheckpointStore
    commits = []
    stock = CheckpointStore.commit
    def commit(self, **kw):
        commits.append(kw["cursor"])
        return stock(self, **kw)
    CheckpointStore.commit = commit
    from qtk.quantize.base import QuantizeOptions
    from qtk.quantize.run import quantize
    out = {}
    for every in sys.argv[4:]:
        os.environ["QTK_RESUME_EVERY"] = every
        commits.clear()
        r = quantize(sys.argv[1], os.path.join(sys.argv[2], every or "default"), QuantizeOptions(
            method="gptq", group_size=64, samples=4, seq_len=64, device="cpu"))
        out[every] = {"commits": list(commits), "provenance": r.provenance["method_details"]["resume_checkpoints"]}
    with open(sys.argv[3], "w") as f:
        json.dump(out, f)
""")


@pytest.mark.slow
def test_a_real_gptq_run_commits_at_the_documented_cadence(smol_layers, tmp_path):
    """GPTQModel's own commits, counted in the run's process (~30-50 s on 2 busy cores): SmolLM2's first 2
    layers under the default cadence publish one checkpoint, after the last layer (before: [1, 2], one per
    layer); QTK_RESUME_EVERY=layer, one per layer. Provenance reports the same."""
    pytest.importorskip("gptqmodel")
    src = smol_layers(2)
    result = tmp_path / "commits.json"
    r = subprocess.run([sys.executable, "-c", _COUNT_COMMITS, str(src), str(tmp_path), str(result), "", "layer"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got[""]["commits"] == [2]
    assert got[""]["provenance"]["written"] == 1 and "60 s" in got[""]["provenance"]["every"]
    assert got["layer"]["commits"] == [1, 2]
    assert got["layer"]["provenance"]["written"] == 2 and got["layer"]["provenance"]["every"] == "after every layer"
