"""Everything qtk quantize refuses, refused before heavy work, with its exit code."""

import json
import shutil

import pytest

from qtk import errors
from qtk.quantize.source import check_group_size, resolve_model


def test_group_size_must_divide_every_layer(smol_layers):
    model = resolve_model(str(smol_layers(2)))
    with pytest.raises(errors.UnsupportedConfigError) as e:
        check_group_size(model, 128)  # SmolLM2's hidden size is 576
    assert "576" in str(e.value) and "model.layers.0." in str(e.value)
    assert "[32, 64]" in e.value.hint
    check_group_size(model, 64)
    check_group_size(model, 32)


def test_cli_refuses_bad_group_size_before_work(qtk, smol_layers, tmp_path):
    r = qtk("quantize", str(smol_layers(2)), "--method", "gptq", "-o", str(tmp_path / "out"))
    assert r.exit_code == 51, r.stderr
    assert "does not divide the input width 576" in r.stderr
    assert not (tmp_path / "out").exists()


def test_already_quantized_refused(qtk, smol_layers, tmp_path):
    src = tmp_path / "q"
    shutil.copytree(smol_layers(2), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    r = qtk("quantize", str(src), "--method", "nf4", "-o", str(tmp_path / "out"))
    assert r.exit_code == 52 and "already quantized" in r.stderr


@pytest.mark.parametrize(
    "edit,needle",
    [
        ({"architectures": ["BertModel"]}, "not a causal language model"),
        ({"torch_dtype": "int8", "dtype": "int8"}, "dtype 'int8'"),
    ],
)
def test_bad_checkpoints_refused(qtk, smol_layers, tmp_path, edit, needle):
    src = tmp_path / "m"
    shutil.copytree(smol_layers(2), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(edit)
    (src / "config.json").write_text(json.dumps(cfg))
    r = qtk("quantize", str(src), "--method", "nf4", "-o", str(tmp_path / "out"))
    assert r.exit_code == 52 and needle in r.stderr


def test_missing_weights_and_config(qtk, tmp_path):
    pytest.importorskip("bitsandbytes")  # without it, "backend missing" (50) is refused first
    (tmp_path / "empty").mkdir()
    r = qtk("quantize", str(tmp_path / "empty"), "--method", "nf4", "-o", str(tmp_path / "out"))
    assert r.exit_code == 52 and "no config.json" in r.stderr


@pytest.mark.parametrize("spec, needle", [
    ("/nonexistent", "/nonexistent: no such directory"),
    ("./nope", "./nope: no such directory"),
    ("~/no/such/model", "no such directory"),
    ("a/b/c", "a/b/c: no such directory"),
    ("model.safetensors", "no such file"),
    ("not a repo", "neither a local path nor a repo id"),
    ("org/", "neither a local path nor a repo id"),
])
def test_model_specs_that_name_nothing_are_refused_before_any_work(qtk, tmp_path, spec, needle):
    """Path-like specs that do not exist say so (never "Invalid repo id"), in quantize, verify and plan."""
    pytest.importorskip("bitsandbytes")
    for args in (["quantize", spec, "--method", "nf4", "-o", str(tmp_path / "out")], ["plan", spec]):
        r = qtk(*args)
        assert r.exit_code == 52 and needle in r.stderr, (args, r.stderr)
    assert not (tmp_path / "out").exists()


def test_output_exists_needs_overwrite(qtk, smol_layers, tmp_path):
    (tmp_path / "out").mkdir()
    r = qtk("quantize", str(smol_layers(2)), "--method", "nf4", "-o", str(tmp_path / "out"))
    assert r.exit_code == 53 and "--overwrite" in r.stderr


def test_unsupported_bits_and_unknown_calibration(qtk, smol_layers, tmp_path):
    r = qtk("quantize", str(smol_layers(2)), "--method", "awq", "--bits", "8", "--group-size", "64",
            "-o", str(tmp_path / "o1"))
    assert r.exit_code == 51 and "--bits: awq supports 4 bits, not 8" in r.stderr
    r = qtk("quantize", str(smol_layers(2)), "--method", "gptq", "--group-size", "64", "--calibration", "wikitext",
            "-o", str(tmp_path / "o2"))
    assert r.exit_code == 54 and "prose" in r.stderr
    r = qtk("quantize", str(smol_layers(2)), "--method", "gptq", "--group-size", "64", "--samples", "100000",
            "--seq-len", "2048", "-o", str(tmp_path / "o3"))
    assert r.exit_code == 54 and "tokens need" in r.stderr
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_cuda_asked_without_gpu(qtk, smol_layers, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = qtk("quantize", str(smol_layers(2)), "--method", "nf4", "--device", "cuda", "-o", str(tmp_path / "o"))
    assert r.exit_code == 51 and "CUDA" in r.stderr
