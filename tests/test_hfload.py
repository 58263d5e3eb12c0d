"""qtk.hfload: the GPU kernel fallback for GPTQ/AWQ loads.

The failure it handles (GPTQModel auto-selecting Machete on Hopper for a model with 192-wide layers)
only happens on a CUDA GPU; here transformers' loader is replaced by one that fails the way it fails
there (message measured on an H100), and the real retry logic runs against it.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import transformers  # noqa: E402

from qtk import errors  # noqa: E402
from qtk.hfload import FALLBACK_KERNELS, load_causal_lm  # noqa: E402

MACHETE = ("<class 'gptqmodel.nn_modules.qlinear.machete.MacheteLinear'>: `out_features`: 192 must be "
           "divisible by [128].")


class _Loaded:
    def __init__(self, backend):
        self.backend = backend

    def eval(self):
        return self


def _fake_loader(monkeypatch, works: set[str]):
    calls = []

    def from_pretrained(path, **kw):
        qc = kw.get("quantization_config")
        backend = getattr(qc, "backend", None) if qc is not None else "auto"
        backend = getattr(backend, "value", backend)
        calls.append((backend, kw.get("device_map")))
        if backend not in works:
            raise NotImplementedError(MACHETE if backend == "auto" else f"{backend} cannot either")
        return _Loaded(backend)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return calls


def _ckpt(tmp_path, method="gptq"):
    (tmp_path / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": method, "bits": 4, "group_size": 64}}))
    return tmp_path


def test_gptq_on_cuda_falls_back_to_triton_and_says_so(monkeypatch, tmp_path, caplog):
    calls = _fake_loader(monkeypatch, {"gptq_triton"})
    model, kernel = load_causal_lm(_ckpt(tmp_path), dtype=None, device="cuda")
    assert kernel == "gptq_triton" and model.backend == "gptq_triton"
    assert calls == [("auto", {"": 0}), ("gptq_triton", {"": 0})]
    assert "loaded with gptq_triton" in caplog.text


def test_awq_tries_each_fallback_then_fails_with_every_reason(monkeypatch, tmp_path):
    calls = _fake_loader(monkeypatch, set())
    with pytest.raises(errors.ModelFormatError) as ei:
        load_causal_lm(_ckpt(tmp_path, "awq"), dtype=None, device="cuda")
    assert [c[0] for c in calls] == ["auto", *FALLBACK_KERNELS["awq"]]
    assert "192 must be divisible" in str(ei.value) and "torch_awq cannot either" in str(ei.value)
    assert ei.value.exit_code == 52


def test_no_retry_on_cpu_or_for_unquantized(monkeypatch, tmp_path):
    calls = _fake_loader(monkeypatch, set())
    with pytest.raises(NotImplementedError):
        load_causal_lm(_ckpt(tmp_path), dtype=None, device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotImplementedError):
        load_causal_lm(tmp_path, dtype=None, device="cuda")
    assert len(calls) == 2


def test_automatic_choice_used_when_it_works(monkeypatch, tmp_path):
    _fake_loader(monkeypatch, {"auto"})
    model, kernel = load_causal_lm(_ckpt(tmp_path), dtype=None, device="cpu")
    assert kernel is None and model.backend == "auto"
