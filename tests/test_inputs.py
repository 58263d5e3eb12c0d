"""Every input of qtk verify is checked before the first model loads (torch-free: nothing loads)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def ref_dir(tmp_path):
    pytest.importorskip("numpy")  # qtk verify needs its extra (numpy at least) to start at all
    d = tmp_path / "ref"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return d


@pytest.mark.parametrize("make, needle", [
    (lambda t: str(t / "nonexistent"), "nonexistent: no such directory"),
    (lambda t: str(t / "gone.gguf"), "gone.gguf: no such file"),
    (lambda t: (t / "not.gguf").write_bytes(b"NOPE" * 4) and str(t / "not.gguf"), "not a GGUF"),
    (lambda t: (t / "empty").mkdir() or str(t / "empty"), "no config.json"),
    (lambda t: "no repo id", "neither a local path nor a repo id"),
])
def test_verify_refuses_a_bad_candidate_before_loading_the_reference(qtk, ref_dir, tmp_path, make, needle):
    bad = make(tmp_path)
    r = qtk("verify", str(ref_dir), bad, "--no-smoke")
    assert r.exit_code == 52, r.stderr
    assert needle in r.stderr
    assert "loading" not in r.stderr  # nothing was loaded, not even the reference


def test_verify_refuses_a_bad_reference_the_same_way(qtk, tmp_path, ref_dir):
    r = qtk("verify", str(tmp_path / "missing-ref"), str(ref_dir))
    assert r.exit_code == 52 and "missing-ref: no such directory" in r.stderr


def test_backend_output_goes_to_a_log_file_and_the_terminal_keeps_qtk_messages(tmp_path, capfd):
    """What backends print (Python and file-descriptor level) lands in the log; qtk's stream reaches stderr."""
    import os
    import sys

    from qtk._stdio import backend_output

    log = tmp_path / "run.log"
    with backend_output(log) as term:
        print("python stdout chatter")
        print("python stderr chatter", file=sys.stderr)
        os.write(1, b"native stdout chatter\n")
        os.write(2, b"native stderr chatter\n")
        term.write("qtk progress\n")
        term.flush()
    captured = capfd.readouterr()
    text = log.read_text()
    for line in ("python stdout chatter", "python stderr chatter", "native stdout chatter", "native stderr chatter"):
        assert line in text and line not in captured.out + captured.err
    assert "qtk progress" in captured.err and "qtk progress" not in text


def test_plot_uses_short_tags_and_a_legend_with_the_full_names(tmp_path):
    pytest.importorskip("matplotlib")
    from qtk.verify.report import plot

    names = ["/very/long/path/to/FaceTB/SmolLM2-135M-Instruct", "/x/FaceTB/SmolLM2-135M-Instruct-gptq-w4g64",
             "/x/FaceTB/SmolLM2-135M-Instruct-nf4-w4", "/cache/SmolLM2-135M-Instruct.Q4_1.gguf"]
    models = [{"name": n, "format": f, "role": "reference" if i == 0 else "candidate", "size_bytes": (4 - i) * 1e8,
               "perplexity": {"ppl": 10 + i, "stderr": 0.3},
               "smoke": [{"decode_tps": 20.0 + i}]} for i, (n, f) in enumerate(zip(names, ["bf16", "gptq", "nf4", "gguf"]))]
    report = {"models": models, "protocol": {"ctx": 512}, "hardware": {"device": "cpu"}}
    legend = plot(report, tmp_path / "r.png")
    texts = [t.get_text() for t in legend.get_texts()]
    assert [t.split()[0] for t in texts] == ["M1", "M2", "M3", "M4"]
    assert "SmolLM2-135M-Instruct-gptq-w4g64 (gptq)" in texts[1] and "reference" in texts[0]
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_verify_with_cuda_but_no_gpu_is_refused_before_loading(qtk, ref_dir):
    """One device resolver for quantize, verify, chat and provision: --device cuda without a GPU is
    exit 51 at once (it used to load and then fail with an unmapped error)."""
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    except ImportError:
        pass
    r = qtk("verify", str(ref_dir), str(ref_dir), "--device", "cuda", "--no-smoke")
    assert r.exit_code == 51 and "CUDA" in r.stderr and "loading" not in r.stderr


def test_verify_without_its_extra_says_which_extra(qtk, tmp_path):
    """On a base install (no numpy/torch) qtk verify names the extra instead of a bare ImportError."""
    import importlib.util

    if importlib.util.find_spec("numpy") is not None:
        pytest.skip("numpy is installed: the verify extra is (partly) present")
    r = qtk("verify", str(tmp_path), str(tmp_path))
    assert r.exit_code == 50 and "qtk[verify]" in r.stderr
