"""Resuming an interrupted GPTQ/AWQ run: the per-layer checkpoint under .<output>.qtk-work/, kept after a
kill, reused by the same command, discarded when an input or option changes, removed after success."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtk.quantize import _resume
from qtk.quantize.base import QuantizeOptions, RunContext


def _ctx(tmp_path: Path, work: Path, **opts) -> RunContext:
    from qtk.quantize.calibration import Samples
    from qtk.quantize.source import SourceModel

    weights = tmp_path / "model.safetensors"
    if not weights.exists():
        weights.write_bytes(b"w" * 100)
    model = SourceModel(tmp_path, None, None, {}, (weights,), {})
    samples = Samples(input_ids=[[1, 2, 3]], seq_len=3, seed=0, tokens_available=3, chat_template=False,
                      calibration=None)
    return RunContext(model, QuantizeOptions(method="gptq", **opts), samples, "cpu", tmp_path / "out", work_dir=work)


def test_identity_decides_resume_or_discard(tmp_path):
    work = tmp_path / ".out.qtk-work"
    ident = _resume.run_identity(_ctx(tmp_path, work), "gptq")
    assert _resume._prepare(work, ident) == "fresh"
    assert _resume._prepare(work, ident) == "fresh"  # same identity, nothing published yet
    (work / _resume._STORE).mkdir()
    (work / _resume._STORE / "CURRENT").write_text("{}")
    assert _resume._prepare(work, ident) == "resumed"
    # a changed option: the old checkpoint goes
    other = _resume.run_identity(_ctx(tmp_path, work, group_size=64), "gptq")
    state = _resume._prepare(work, other)
    assert state.startswith("discarded") and "options" in state
    assert not (work / _resume._STORE).exists()
    # a changed source file (size/mtime), a changed method, an unreadable identity file
    (work / _resume._STORE).mkdir()
    (work / _resume._STORE / "CURRENT").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"v" * 101)
    assert "source" in _resume._prepare(work, _resume.run_identity(_ctx(tmp_path, work, group_size=64), "gptq"))
    assert "method" in _resume._prepare(work, _resume.run_identity(_ctx(tmp_path, work, group_size=64), "awq"))
    (work / _resume._IDENTITY).write_text("{not json")
    assert _resume._prepare(work, ident).startswith("discarded")


def _cursor(work: Path) -> int:
    """The number of layers GPTQModel's checkpoint has published (0: none)."""
    try:
        current = json.loads((work / _resume._STORE / "CURRENT").read_text())
        ref = current["generations"][0]
        return int(json.loads((work / _resume._STORE / "objects" / ref).read_bytes())["cursor"])
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _quantize_cmd(src: Path, out: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "qtk", "quantize", str(src), "--method", method, "--group-size", "64",
            "--samples", "8", "--seq-len", "128", "--device", "cpu", "-o", str(out), "--json"]


@pytest.mark.slow
def test_killed_gptq_run_resumes_to_the_same_bytes(smol_layers, tmp_path):
    """kill -9 after half the layers (1 of 2); the same command finishes from the checkpoint and writes the same
    weights, byte for byte, as an uninterrupted run; the checkpoint is gone afterwards."""
    pytest.importorskip("gptqmodel")
    torch = pytest.importorskip("torch")
    src = smol_layers(2)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
    fresh = tmp_path / "fresh"
    r = subprocess.run(_quantize_cmd(src, fresh, "gptq"), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["method_details"]["resume"] == "fresh"

    out = tmp_path / "resumed"
    work = tmp_path / ".resumed.qtk-work"
    p = subprocess.Popen(_quantize_cmd(src, out, "gptq"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 600
    while _cursor(work) < 1 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _cursor(work) == 1 and not out.exists()  # one of two layers published, no output yet
    r = subprocess.run(_quantize_cmd(src, out, "gptq"), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["method_details"]["resume"] == "resumed"
    assert not work.exists()
    from safetensors.torch import load_file

    files = sorted(f.name for f in fresh.glob("*.safetensors"))
    assert files and files == sorted(f.name for f in out.glob("*.safetensors"))
    for name in files:  # every tensor byte-identical (the header's key order may differ)
        a, b = load_file(fresh / name), load_file(out / name)
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert a[key].view(-1).view(torch.uint8).equal(b[key].view(-1).view(torch.uint8)), key


def test_awq_runs_without_a_checkpoint_and_says_why(tmp_path):
    """GPTQModel 7.6 writes AWQ checkpoints it then cannot restore (tensor schema differs, measured):
    AWQ is not checkpointed, and the provenance says so; without a work dir nothing is checkpointed."""
    pytest.importorskip("gptqmodel")
    work = tmp_path / ".out.qtk-work"
    with _resume.checkpointing(_ctx(tmp_path, work), None, "awq") as (checkpoint, details):
        assert checkpoint is None and details["resume"].startswith("off: gptqmodel 7.6 cannot restore")
    assert not work.exists()
    ctx = _ctx(tmp_path, work)
    ctx = RunContext(ctx.model, ctx.options, ctx.samples, ctx.device, ctx.out, work_dir=None)
    with _resume.checkpointing(ctx, None, "gptq") as (checkpoint, details):
        assert checkpoint is None and details == {"resume": "off"}


def test_hf_cache_snapshot_sources_are_named_as_not_checkpointable(tmp_path):
    """GPTQModel 7.6 refuses checkpoints whose source files link outside the model dir (every HF-cache
    snapshot does): qtk sees it first and runs without a checkpoint instead of failing."""
    from qtk.quantize._resume import _links_out_of

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "1234").write_text("{}")
    (snap / "config.json").symlink_to("../../blobs/1234")
    (snap / "model.safetensors").write_bytes(b"x")
    assert _links_out_of(snap, ["config.json", "model.safetensors"]) == "config.json"
    (snap / "config.json").unlink()
    (snap / "config.json").write_text("{}")
    assert _links_out_of(snap, ["config.json", "model.safetensors"]) is None
