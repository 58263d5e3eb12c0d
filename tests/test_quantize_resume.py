"""Resuming an interrupted GPTQ/AWQ run: the per-layer checkpoint under .<output>.qtk-work/, kept after a
kill, reused by the same command, discarded when an input or option changes, removed after success."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@pytest.fixture
def threads_without_torch(monkeypatch):
    """The identity's torch thread count without importing torch: these tests also run on the torch-free
    profile (the count's own effect is tested with real runs below)."""
    monkeypatch.setattr(_resume, "torch_threads", lambda: 2)


def test_identity_decides_resume_or_discard(tmp_path, threads_without_torch):
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


@pytest.mark.parametrize("env, run_args, changed", [
    ({"QTK_AWQ_SEARCH": "stock"}, {}, "qtk"),  # another search path of qtk's own code
    ({"QTK_AWQ_SCALE_GRID": "full"}, {}, "qtk"),
    ({}, {"batch_size": 4}, "run_args"),  # GPTQ's Hessian sums depend on the batching
    ({}, {"backend": "auto"}, "run_args"),
    ({"QTK_DEBUG": "1", "QTK_TEST_CACHE": "/elsewhere"}, {}, None),  # selects no algorithm: resumed
])
def test_what_selects_the_algorithm_is_part_of_the_identity(tmp_path, monkeypatch, env, run_args, changed,
                                                            threads_without_torch):
    work = tmp_path / ".out.qtk-work"
    ctx = _ctx(tmp_path, work)
    base = {"batch_size": 1, "backend": "awq_torch"}
    assert _resume._prepare(work, _resume.run_identity(ctx, "awq", base)) == "fresh"
    (work / _resume._STORE).mkdir()
    (work / _resume._STORE / "CURRENT").write_text("{}")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    state = _resume._prepare(work, _resume.run_identity(ctx, "awq", {**base, **run_args}))
    assert state == "resumed" if changed is None else state == f"discarded (changed: {changed})"


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


def _kill_at_layer(cmd: list[str], work: Path, env: dict, layer: int) -> int:
    """Run ``cmd``; kill -9 once its checkpoint has published ``layer`` layers or more (a checkpoint every N
    layers publishes several at once). Returns the layers published when it died."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 600
    while _cursor(work) < layer and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return _cursor(work)


def _kill_after_first_layer(cmd: list[str], work: Path, env: dict) -> None:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 600
    while _cursor(work) < 1 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def _same_tensors(a_dir: Path, b_dir: Path) -> None:
    """Every tensor of every .safetensors file byte-identical (the header's key order may differ)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(f.name for f in a_dir.glob("*.safetensors"))
    assert files and files == sorted(f.name for f in b_dir.glob("*.safetensors"))
    for name in files:
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert a[key].view(-1).view(torch.uint8).equal(b[key].view(-1).view(torch.uint8)), key


@pytest.fixture
def smol_in_hf_cache(smol_layers, tmp_path):
    """SmolLM2's first 2 layers served by a local mirror as acme/smol and pulled with `qtk pull` into this
    test's HF cache (HF_HOME): a real snapshot whose files link into blobs/. Yields (repo id, snapshot)."""
    from hubtest import start_server

    root = tmp_path / "upstream"
    shutil.copytree(smol_layers(2), root / "acme" / "smol")
    srv = start_server(root)
    try:
        env = {**os.environ, "HF_ENDPOINT": srv.url}
        r = subprocess.run([sys.executable, "-m", "qtk", "pull", "acme/smol", "--json"], capture_output=True,
                           text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        snap = next((Path(os.environ["HF_HOME"]) / "hub" / "models--acme--smol" / "snapshots").iterdir())
        assert (snap / "model.safetensors").is_symlink() and (snap / "config.json").is_symlink()
        yield "acme/smol", snap, env
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_killed_run_resumes_to_the_same_bytes(method, smol_layers, smol_in_hf_cache, tmp_path):
    """kill -9 after half the layers (1 of 2); the same command finishes from the checkpoint and writes the same
    weights, byte for byte, as an uninterrupted run; the checkpoint is gone afterwards. GPTQ runs from the HF
    cache (`qtk quantize acme/smol` after `qtk pull`) and is compared with a run from a plain directory; AWQ
    resumes from a plain directory (GPTQModel 7.6 needs qtk's restore fix for it)."""
    pytest.importorskip("gptqmodel")
    repo, snap, env = smol_in_hf_cache
    env = {**env, "GPTQMODEL_CPU_WORKERS": "2", "QTK_RESUME_EVERY": "layer"}  # a checkpoint per layer (default: by time)
    plain = smol_layers(2)
    fresh = tmp_path / "fresh"
    r = subprocess.run(_quantize_cmd(plain, fresh, method), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["method_details"]["resume"] == "fresh"

    src = repo if method == "gptq" else plain
    cache_repo = snap.parent.parent
    cache_before = sorted((str(p), p.is_symlink()) for p in cache_repo.rglob("*"))
    out, work = tmp_path / "resumed", tmp_path / ".resumed.qtk-work"
    _kill_after_first_layer(_quantize_cmd(src, out, method), work, env)
    assert _cursor(work) == 1 and not out.exists()  # one of two layers published, no output yet
    r = subprocess.run(_quantize_cmd(src, out, method), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    prov = json.loads(r.stdout)
    assert prov["method_details"]["resume"] == "resumed"
    fixes = {"gptq": ["source links followed"], "awq": ["awq restore in the packed dtype"]}[method]
    assert prov["method_details"]["resume_gptqmodel_fixes"] == fixes
    if method == "gptq":
        assert prov["source"]["path"] == str(snap) and prov["source"]["repo_id"] == repo
    assert not work.exists()
    # nothing was written, copied or linked into the cache (a read-only or shared cache works the same)
    assert sorted((str(p), p.is_symlink()) for p in cache_repo.rglob("*")) == cache_before
    _same_tensors(fresh, out)


def test_awq_and_cache_sources_without_the_fix_run_unchecked_and_say_why(tmp_path, monkeypatch):
    """Where qtk's fixes of GPTQModel's checkpointing do not apply (another GPTQModel, other code), AWQ and
    sources that link out of their directory run without a checkpoint, and the provenance says why; without a
    work dir nothing is checkpointed."""
    pytest.importorskip("gptqmodel")
    work = tmp_path / ".out.qtk-work"
    monkeypatch.setitem(_resume._KNOWN_SOURCES, "restore_packed_module", "0" * 64)
    with _resume.checkpointing(_ctx(tmp_path, work), None, "awq") as (checkpoint, details):
        assert checkpoint is None
        assert details["resume"].startswith("off: gptqmodel cannot restore its AWQ checkpoints without qtk's fix")
        assert "restore_packed_module is not the code it was checked against" in details["resume"]
    monkeypatch.setattr(_resume, "_FIXED_FOR", "7.5.9")
    blobs, snap = tmp_path / "c" / "blobs", tmp_path / "c" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "1234").write_bytes(b"w" * 100)
    (snap / "model.safetensors").symlink_to("../../blobs/1234")
    ctx = _ctx(snap, work)
    with _resume.checkpointing(ctx, None, "gptq") as (checkpoint, details):
        assert checkpoint is None and "model.safetensors does: an HF-cache snapshot" in details["resume"]
        assert "written for gptqmodel 7.5.9" in details["resume"]
    assert not work.exists()
    ctx = RunContext(ctx.model, ctx.options, ctx.samples, ctx.device, ctx.out, work_dir=None)
    with _resume.checkpointing(ctx, None, "gptq") as (checkpoint, details):
        assert checkpoint is None and details == {"resume": "off"}


def test_the_installed_gptqmodel_takes_both_fixes():
    """The digests in _resume are those of the installed GPTQModel 7.6.0 (a changed pin fails here, not silently
    at a user's resume)."""
    import importlib.metadata

    pytest.importorskip("gptqmodel")
    if importlib.metadata.version("gptqmodel") != _resume._FIXED_FOR:
        pytest.skip("another gptqmodel: the fixes are off there (tested above)")
    for name in _resume._KNOWN_SOURCES:
        assert _resume._unfixable(name) is None, name


def _snapshot(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """The same files as a plain directory and as an HF-cache snapshot linking into blobs/."""
    plain, repo = tmp_path / "plain", tmp_path / "models--acme--m"
    snap = repo / "snapshots" / ("a" * 40)
    for rel, data in files.items():
        (plain / rel).parent.mkdir(parents=True, exist_ok=True)
        (plain / rel).write_bytes(data)
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    return plain, snap


@pytest.mark.parametrize("sharded", [False, True])
def test_source_identity_of_a_snapshot_is_that_of_a_plain_copy(tmp_path, sharded):
    """qtk's source identity accepts an HF-cache snapshot (GPTQModel's own refuses it) and gives the same
    identity GPTQModel's gives a plain copy of the directory: same content, same checkpoint identity."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.looper import gptq_checkpoint
    from gptqmodel.looper.checkpoint_store import CheckpointError

    files = {"config.json": b'{"model_type": "llama"}'}
    if sharded:
        files |= {"model-00001-of-00002.safetensors": b"one" * 50, "model-00002-of-00002.safetensors": b"two" * 50,
                  "model.safetensors.index.json": json.dumps({"weight_map": {
                      "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode()}
    else:
        files["model.safetensors"] = b"weights" * 30
    plain, snap = _snapshot(tmp_path, files)
    as_model = lambda p: type("M", (), {"model_local_path": str(p)})()  # noqa: E731
    stock = gptq_checkpoint._source_identity(as_model(plain))
    assert len(stock) == (3 if sharded else 2)
    assert _resume.source_identity(as_model(plain)) == stock
    assert _resume.source_identity(as_model(snap)) == stock
    with pytest.raises(CheckpointError, match="escapes the model directory"):
        gptq_checkpoint._source_identity(as_model(snap))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", ""])
def test_source_identity_refuses_shard_names_out_of_the_directory(tmp_path, shard):
    """A crafted index.json cannot make the identity read a file outside the model directory by its name."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.looper.checkpoint_store import CheckpointError

    (tmp_path / "outside.safetensors").write_bytes(b"x")
    model_dir = tmp_path / "m"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match="escapes the model directory"):
        _resume.source_identity(type("M", (), {"model_local_path": str(model_dir)})())


@given(st.lists(st.sampled_from(["..", ".", "", "a", "b.safetensors", "/", "//", "\\", "..a", "a..", "~"]),
                min_size=0, max_size=6))
def test_a_shard_name_accepted_stays_below_the_model_directory(parts):
    """Property: any name the check accepts, joined to the model directory and normalized lexically, is below
    the directory (never the directory itself, never outside it)."""
    name = "/".join(parts)
    if _resume._names_a_file_inside(name):
        root = "/models/m"
        joined = os.path.normpath(os.path.join(root, name))
        assert joined.startswith(root + "/"), name


@pytest.mark.slow
def test_killed_at_a_random_layer_resumes_to_the_same_bytes_under_the_same_threads(smol_layers, tmp_path):
    """kill -9 at a random layer of 4 (QTK_TEST_KILL_LAYER=k replays one); the same command resumes and
    writes the bytes of an uninterrupted run. The same kill under another torch thread count (1, then 2):
    GPTQ's bytes on the CPU depend on the thread count, so the checkpoint is discarded and the run redone,
    never finished as a mix of layers computed under two counts (before: "resumed", and the layers after
    the resume matched neither run: 25-56 of 122 tensors differed)."""
    pytest.importorskip("gptqmodel")
    layers = 4
    k = int(os.environ.get("QTK_TEST_KILL_LAYER") or random.randint(1, layers - 1))
    print(f"kill at layer {k} of {layers} (replay: QTK_TEST_KILL_LAYER={k})")
    src = smol_layers(layers)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "OMP_NUM_THREADS": "2", "QTK_RESUME_EVERY": "layer"}
    fresh = tmp_path / "fresh"
    r = subprocess.run(_quantize_cmd(src, fresh, "gptq"), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["torch_threads"] == 2
    for name, killed_env, state in (("same", env, "resumed"), ("threads", {**env, "OMP_NUM_THREADS": "1"},
                                                                  "discarded (changed: torch_threads)")):
        out, work = tmp_path / name, tmp_path / f".{name}.qtk-work"
        published = _kill_at_layer(_quantize_cmd(src, out, "gptq"), work, killed_env, k)
        assert k <= published <= layers and not out.exists(), (k, published)
        r = subprocess.run(_quantize_cmd(src, out, "gptq"), capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout)["method_details"]["resume"] == state, (name, k)
        _same_tensors(fresh, out)
