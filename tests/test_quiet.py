"""Quiet by default: backends' output goes to a per-run log whose path is printed; the terminal keeps
qtk's own messages; -v streams the backends live; --quiet prints nothing but the result; an error
raised inside a backend still reaches the user, with the log named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qtk import methods as registry

BROKEN = registry.MethodSpec("toy-broken", "toy_method:ToyBroken", "toy", reads=("bits",),
                             memory_model="quantized_load", weights="nf4", summary="fails inside its backend")


@pytest.fixture
def broken():
    registry.register(BROKEN)
    yield
    registry.unregister(BROKEN.name)


@pytest.fixture
def tiny(hub_root):
    src = hub_root / "acme" / "tiny-llama"
    if not src.is_dir():
        pytest.skip("tiny-llama fixture needs numpy/safetensors")
    pytest.importorskip("torch")
    return src


def _log_path(stderr: str) -> Path:
    m = re.search(r"(?:backend output|Backend output of this run): (\S+\.log)", stderr)
    assert m, stderr
    return Path(m.group(1))


def test_backend_error_reaches_the_user_with_the_log(qtk, broken, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QTK_LOG_DIR", str(tmp_path / "logs"))
    r = qtk("quantize", str(tiny), "--method", "toy-broken", "--bits", "2", "-o", str(tmp_path / "out"))
    assert r.exit_code == 1
    assert "backend exploded in layer 3" in r.stderr  # qtk's message carries the backend's
    log = _log_path(r.stderr)
    assert log.parent == tmp_path / "logs"
    text = log.read_text()
    for chatter in ("backend banner on stdout", "backend progress on stderr", "native library chatter"):
        assert chatter in text and chatter not in r.stderr + r.stdout
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_verbose_streams_the_backend_and_writes_no_log(qtk, broken, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QTK_LOG_DIR", str(tmp_path / "logs"))
    r = qtk("quantize", str(tiny), "--method", "toy-broken", "--bits", "2", "-o", str(tmp_path / "out"), "-v")
    assert r.exit_code == 1
    assert "backend banner on stdout" in r.stderr and "backend progress on stderr" in r.stderr
    assert r.stdout == ""  # stdout stays the result's, even live
    assert not (tmp_path / "logs").exists()


def test_quiet_prints_only_the_result(qtk, tiny, tmp_path, monkeypatch):
    from qtk.methods import MethodSpec

    toy = MethodSpec("toy", "toy_method:Toy", "toy", reads=("bits",), memory_model="quantized_load", weights="nf4",
                     summary="toy")
    registry.register(toy)
    try:
        monkeypatch.setenv("QTK_LOG_DIR", str(tmp_path / "logs"))
        r = qtk("quantize", str(tiny), "--method", "toy", "--bits", "2", "-o", str(tmp_path / "q"), "--quiet")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.strip() == str(tmp_path / "q") and r.stderr == ""
        r = qtk("quantize", str(tiny), "--method", "toy", "--bits", "2", "-o", str(tmp_path / "n"))
        assert r.exit_code == 0, r.stderr
        lines = r.stderr.strip().splitlines()
        assert _log_path(r.stderr).is_file() and len(lines) <= 4, r.stderr
    finally:
        registry.unregister("toy")


@pytest.mark.slow
def test_real_backend_output_stays_in_the_log(qtk, smol_layers, tmp_path, monkeypatch):
    """GPTQ through GPTQModel: the terminal shows qtk's layer progress, a handful of lines; the
    thousands of backend lines (banners, per-row bars, warnings) are in the log."""
    pytest.importorskip("gptqmodel")
    monkeypatch.setenv("QTK_LOG_DIR", str(tmp_path / "logs"))
    r = qtk("quantize", str(smol_layers(2)), "--method", "gptq", "--group-size", "64", "--samples", "4",
            "--seq-len", "64", "-o", str(tmp_path / "g"))
    assert r.exit_code == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 10, r.stderr
    assert any("layers done: 2/2" in line and "peak" in line for line in lines), r.stderr
    log = _log_path(r.stderr).read_text()
    assert len(log.splitlines()) > 50 and "GPTQ" in log.upper()
