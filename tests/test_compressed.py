"""FP8 and INT8 W8A8 (compressed-tensors) without a model: the registry entries, the refusal on Python 3.10
or without compressed-tensors, option and manifest checks, format detection and the planner's sizes. Torch-free
(runs in the 3.10/3.13 profiles too); the real-model tests are in test_compressed_model.py."""

from __future__ import annotations

import json
import math
import sys

import pytest

from qtk import errors
from qtk import plan as P
from qtk import methods as registry
from qtk.quantize import _compressed
from qtk.quantize.base import QuantizeOptions
from qtk.quantize.fp8 import FP8
from qtk.quantize.w8a8 import W8A8


def test_fp8_and_w8a8_are_registered_with_their_formats():
    fp8, w8a8 = registry.method_spec("fp8"), registry.method_spec("w8a8")
    assert (fp8.output_format, fp8.weights, fp8.memory_model) == ("fp8", "fp8-dynamic", "whole_model")
    assert (w8a8.output_format, w8a8.weights, w8a8.memory_model) == ("w8a8", "int8-w8a8", "whole_model")
    assert fp8.reads == ()  # data-free, 8-bit only
    assert {"smooth", "smooth_alpha", "calibration", "samples", "seq_len"} <= set(w8a8.reads)
    assert P.quantized_format("fp8") is P.FORMATS["fp8-dynamic"]
    assert P.quantized_format("w8a8") is P.FORMATS["int8-w8a8"]
    assert FP8().bits == W8A8().bits == (8,)
    assert FP8().expected_config(QuantizeOptions("fp8", bits=8)) == {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"]}
    assert W8A8().expected_config(QuantizeOptions("w8a8", bits=8))["format"] == "int-quantized"


def test_help_lists_the_methods_and_the_smoothing_options(qtk):
    r = qtk("quantize", "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for words in ("fp8: compressed-tensors FP8 for vLLM", "w8a8: compressed-tensors INT8 W8A8", "--smooth / --no-smooth",
                  "--smooth-alpha", "--method fp8", "--method w8a8", "Python >= 3.11"):
        assert words in text, words


@pytest.fixture
def new_enough(monkeypatch):
    """The import path on any Python: pretend the minimum is met."""
    monkeypatch.setattr(_compressed, "MIN_PYTHON", (3, 0))


def test_missing_compressed_tensors_is_refused_with_the_extra(qtk, new_enough, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails, find_spec finds nothing
    for method in (FP8(), W8A8()):
        assert "compressed_tensors" in method.unavailable_reason()
        with pytest.raises(errors.BackendUnavailableError) as e:
            method.check_available()
        assert "qtk[compressed]" in e.value.hint
    r = qtk("quantize", str(tmp_path), "--method", "fp8", "-o", str(tmp_path / "out"))
    assert r.exit_code == errors.BackendUnavailableError.exit_code, r.stderr
    assert "compressed_tensors" in r.stderr and "qtk[compressed]" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_older_python_is_refused_with_the_reason(qtk, monkeypatch, tmp_path):
    """What Python 3.10 users see: the methods stay listed, and say why they cannot run."""
    monkeypatch.setattr(_compressed, "MIN_PYTHON", (sys.version_info.major, sys.version_info.minor + 1))
    need = f"{sys.version_info.major}.{sys.version_info.minor + 1}"
    for method in (FP8(), W8A8()):
        reason = method.unavailable_reason()
        assert f"needs Python >= {need}" in reason and f"this is Python {sys.version_info.major}." in reason
        assert method.describe()["available"] is False
    r = qtk("quantize", str(tmp_path), "--method", "w8a8", "-o", str(tmp_path / "out"))
    assert r.exit_code == errors.BackendUnavailableError.exit_code, r.stderr
    text = " ".join(r.stderr.split())
    assert f"needs Python >= {need}" in text and "gptq, awq and nf4 work on this Python" in text
    assert "w8a8" in qtk("quantize", "--help").stdout  # still listed


def test_this_python_answers_truthfully():
    import importlib.util

    reason = FP8().unavailable_reason()
    if sys.version_info < (3, 11):  # the 3.10 torch-free profile: the real refusal, no simulation
        assert reason is not None and "needs Python >= 3.11" in reason
    else:
        present = all(importlib.util.find_spec(m) for m in ("compressed_tensors", "transformers", "accelerate"))
        assert (reason is None) == present, reason


@pytest.mark.parametrize("method, options, refused", [
    ("fp8", {"bits": 4}, {"bits"}),
    ("w8a8", {"bits": 4}, {"bits"}),
    ("fp8", {"samples": 0, "seq_len": 1}, set()),  # data-free: calibration options are not read
    ("fp8", {"group_size": 3}, set()),  # one scale per channel: no groups
    ("w8a8", {"smooth_alpha": 0.0}, set()),
    ("w8a8", {"smooth_alpha": 1.0}, set()),
    ("w8a8", {"smooth_alpha": -0.1}, {"smooth_alpha"}),
    ("w8a8", {"smooth_alpha": 1.5}, {"smooth_alpha"}),
    ("w8a8", {"smooth_alpha": math.nan}, {"smooth_alpha"}),
    ("w8a8", {"smooth_alpha": math.inf}, {"smooth_alpha"}),
    ("w8a8", {"samples": 0}, {"samples"}),  # smoothing reads the calibration set
    ("w8a8", {"samples": 0, "seq_len": 2, "smooth": False}, set()),  # --no-smooth reads none
])
def test_options_each_method_refuses(method, options, refused):
    m = registry.get_method(method)
    assert set(m.option_problems(QuantizeOptions(method, **{"bits": 8, **options}))) == refused


def test_calibration_only_when_smoothing():
    assert FP8().calibrates(QuantizeOptions("fp8", bits=8)) is False
    assert W8A8().calibrates(QuantizeOptions("w8a8", bits=8)) is True
    assert W8A8().calibrates(QuantizeOptions("w8a8", bits=8, smooth=False)) is False


def _manifest(tmp_path, recipe: str) -> object:
    path = tmp_path / f"m{len(list(tmp_path.glob('m*.toml')))}.toml"
    path.write_text(f'store = "store"\n[[models]]\nrepo = "acme/smol"\n[[models.recipes]]\n{recipe}\n')
    return path


def test_manifest_recipes_default_to_8_bits_and_check_smoothing(tmp_path):
    from qtk.provision.manifest import ManifestError, load_manifest

    recipe = load_manifest(_manifest(tmp_path, 'method = "fp8"')).models[0].recipes[0]
    assert recipe.params["bits"] == 8
    recipe = load_manifest(_manifest(tmp_path, 'method = "w8a8"\nsmooth_alpha = 0.8\nsmooth = false')).models[0].recipes[0]
    assert (recipe.params["bits"], recipe.params["smooth_alpha"], recipe.params["smooth"]) == (8, 0.8, False)
    with pytest.raises(ManifestError, match=r"recipes\[0\]\.smooth_alpha: must be between 0 and 1"):
        load_manifest(_manifest(tmp_path, 'method = "w8a8"\nsmooth_alpha = 2'))
    with pytest.raises(ManifestError, match=r"recipes\[0\]\.smooth"):
        load_manifest(_manifest(tmp_path, 'method = "w8a8"\nsmooth = "yes"'))
    with pytest.raises(ManifestError, match=r"recipes\[0\]\.bits: fp8 supports 8 bits, not 4"):
        load_manifest(_manifest(tmp_path, 'method = "fp8"\nbits = 4'))


def test_provision_keys_follow_what_each_method_reads(tmp_path):
    pytest.importorskip("numpy")  # provision's verify step options live in qtk.verify (numpy)
    from qtk.provision.manifest import load_manifest
    from qtk.provision.run import ProvisionOptions, Provisioner

    def key(recipe: str) -> str:
        m = load_manifest(_manifest(tmp_path, recipe))
        inputs = Provisioner(m, ProvisionOptions(dry_run=True))._inputs(
            m.models[0], m.models[0].recipes[0], {"repo": "acme/smol", "commit": "0" * 40})
        return inputs["keys"]["quantize"]

    assert key('method = "fp8"') == key('method = "fp8"\nsamples = 7\nseq_len = 64\nsmooth_alpha = 0.9')
    w = key('method = "w8a8"')
    assert w != key('method = "w8a8"\nsmooth_alpha = 0.8') and w != key('method = "w8a8"\nsmooth = false')
    assert w != key('method = "w8a8"\nsamples = 7')


def _qc(weights: object, acts: object, **extra) -> dict:
    return {"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": weights,
                                                                                  "input_activations": acts}}, **extra}


_F8 = {"num_bits": 8, "type": "float"}
_I8 = {"num_bits": 8, "type": "int"}


@pytest.mark.parametrize("qc, fmt", [
    (_qc(_F8, _F8), "fp8"),
    (_qc(_I8, _I8), "w8a8"),
    (_qc(_I8, None), "compressed-tensors"),  # weight-only (W8A16): not one of qtk's
    (_qc({"num_bits": 4, "type": "int"}, _I8), "compressed-tensors"),
    (_qc(_F8, _I8), "compressed-tensors"),
    (_qc(_F8, {"num_bits": "8", "type": "float"}), "compressed-tensors"),
    (_qc("float8", _F8), "compressed-tensors"),
    (_qc([1], [2]), "compressed-tensors"),
    ({"quant_method": "compressed-tensors", "config_groups": [_F8]}, "compressed-tensors"),
    ({"quant_method": "compressed-tensors", "config_groups": {"a": {"weights": _F8, "input_activations": _F8},
                                                              "b": {"weights": _I8, "input_activations": _I8}}},
     "compressed-tensors"),
    ({"quant_method": "compressed-tensors", "config_groups": {"a": "x"}}, "compressed-tensors"),
    ({"quant_method": "compressed-tensors", "config_groups": None}, "compressed-tensors"),
    ({"quant_method": "compressed-tensors"}, "compressed-tensors"),
    (_qc({"num_bits": 8, "type": "bogus"}, {"num_bits": 8, "type": "bogus"}), "compressed-tensors"),
])
def test_verify_detects_the_compressed_formats(tmp_path, qc, fmt):
    pytest.importorskip("numpy")
    from qtk.verify.models import detect_format

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    assert detect_format(tmp_path) == fmt


def test_plan_sizes_keep_embeddings_in_16_bit():
    """Llama-3.1-8B: 6.98B linear parameters at 1 byte (+ per-row scales), 1.05B embedding + 1.05B lm_head
    parameters at 2 bytes: 11.2 GB, not the 8.0 GB of the every-parameter 'fp8' row."""
    shape = P.shape_from_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                 "intermediate_size": 14336, "tie_word_embeddings": False})
    for name in ("fp8-dynamic", "int8-w8a8"):
        got = P.weight_bytes(shape, P.FORMATS[name])
        want = shape.linear * (1 + 2 / 4096) + (shape.total - shape.linear) * 2  # one bf16 scale per row of ~4096
        assert abs(got - want) / want < 0.005, (name, got, want)
    assert P.weight_bytes(shape, P.FORMATS["fp8"]) < P.weight_bytes(shape, P.FORMATS["fp8-dynamic"])


def test_plan_memory_of_the_whole_model_methods():
    shape = P.shape_from_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
                                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                 "intermediate_size": 1536, "tie_word_embeddings": True})
    bf16 = P.weight_bytes(shape, P.FORMATS["bf16"])
    fp8 = P.quantize_memory(shape, "fp8", device="cpu", samples=64, seq_len=256)
    w8a8 = P.quantize_memory(shape, "w8a8", device="cpu", samples=64, seq_len=256)
    assert fp8["holds"] == w8a8["holds"] == "whole model"
    # measured on this model (BENCHMARKS.md): FP8 0.88 GB, W8A8 smoothed over 64 x 256 tokens 1.32 GB peak RSS
    assert fp8["host_bytes"] == pytest.approx(0.88e9, rel=0.15)
    assert w8a8["host_bytes"] == pytest.approx(1.32e9, rel=0.15)
    assert w8a8["host_bytes"] > fp8["host_bytes"] + bf16 // 2  # FP32 on the CPU while it calibrates
    gpu = P.quantize_memory(shape, "fp8", device="cuda")
    assert gpu["device_bytes"] == bf16  # the BF16 model on the GPU, nothing else for the data-free method
