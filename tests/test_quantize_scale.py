"""Scaling qtk quantize: AWQ's clip search (same result as GPTQModel's, without the giant temporary)."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gptqmodel")

from qtk.quantize import _awq_clip  # noqa: E402


def _processor(group_size: int, sym: bool, bits: int = 4):
    """An object with what AWQProcessor's clip search reads: qcfg and the in-place pseudo-quantizer."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    self = types.SimpleNamespace(qcfg=types.SimpleNamespace(group_size=group_size, sym=sym, bits=bits))
    self._pseudo_quantize_tensor_into = types.MethodType(AWQProcessor._pseudo_quantize_tensor_into, self)
    return self


def _inputs(out_features: int, in_features: int, tokens: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    w[:, ::7] *= 4  # a few outlier columns, as real weights have
    x = torch.randn(2, tokens, in_features, generator=g)
    x[..., ::5] *= 3
    return w.to(dtype), x.to(dtype)


@pytest.mark.parametrize("out_features, in_features, group_size, sym", [
    (192, 128, 64, False),  # SmolLM2's v_proj rows (not a multiple of 256: stock batches 64)
    (512, 256, 64, True),
    (256, 192, -1, False),  # one group per row
    (320, 128, 32, False),  # a partial last out-channel batch in the stock code's 64s
])
def test_clip_search_equals_the_stock_search_in_float32(out_features, in_features, group_size, sym):
    from gptqmodel.looper.awq_processor import AWQProcessor

    proc = _processor(group_size, sym)
    w, x = _inputs(out_features, in_features, 300, torch.float32, seed=out_features + in_features)
    stock = AWQProcessor._compute_best_clip(proc, w, x)
    ours = _awq_clip.compute_best_clip(proc, w, x)
    assert ours.shape == stock.shape and ours.dtype == stock.dtype
    assert torch.equal(ours, stock)


def test_clip_search_in_bf16_differs_only_where_the_stock_rounding_does():
    """In bf16 the stock code rounds each product to bf16 before summing; the bmm sums exact products in
    float32. The chosen clip agrees almost everywhere, and where it differs, by one grid step or so."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    proc = _processor(64, False)
    w, x = _inputs(256, 256, 512, torch.bfloat16, seed=3)
    stock = AWQProcessor._compute_best_clip(proc, w, x).float()
    ours = _awq_clip.compute_best_clip(proc, w, x).float()
    assert (ours == stock).float().mean() > 0.95
    org = w.float().reshape(256, -1, 64).abs().amax(-1, keepdim=True)
    # both are org_max * (1 - i/20), i in 0..9: never outside the stock grid
    ratio = ours / org
    assert ((ratio > 0.5 - 1e-2) & (ratio <= 1 + 1e-2)).all()


def test_fast_clip_search_patches_for_one_run_and_restores():
    from gptqmodel.looper.awq_processor import AWQProcessor

    stock = AWQProcessor.__dict__["_compute_best_clip"]
    with _awq_clip.fast_clip_search() as which:
        assert which == _awq_clip.CLIP_SEARCH_FAST
        assert AWQProcessor._compute_best_clip is _awq_clip.compute_best_clip
    assert AWQProcessor.__dict__["_compute_best_clip"] is stock
    with pytest.raises(RuntimeError), _awq_clip.fast_clip_search():
        raise RuntimeError("a failing quantization")
    assert AWQProcessor.__dict__["_compute_best_clip"] is stock
    with _awq_clip.fast_clip_search(enabled=False) as which:
        assert which == _awq_clip.CLIP_SEARCH_STOCK
        assert AWQProcessor.__dict__["_compute_best_clip"] is stock


@pytest.mark.parametrize("change, why", [
    ("version", "not a version qtk's clip search was checked against"),
    ("digest", "differs from the one qtk's replacement reproduces"),
    ("signature", "takes"),
])
def test_a_changed_backend_falls_back_to_the_stock_search_with_a_warning(monkeypatch, change, why):
    from gptqmodel.looper.awq_processor import AWQProcessor

    stock = AWQProcessor.__dict__["_compute_best_clip"]
    if change == "version":
        monkeypatch.setattr(_awq_clip, "_KNOWN", {"0.0.1": "0" * 64})
    elif change == "digest":
        monkeypatch.setattr(_awq_clip, "_KNOWN", {k: "0" * 64 for k in _awq_clip._KNOWN})
    else:
        def _compute_best_clip(self, w, input_feat, n_grid=20, max_shrink=0.5):  # a new signature
            return stock(self, w, input_feat, n_grid=n_grid, max_shrink=max_shrink)

        monkeypatch.setattr(AWQProcessor, "_compute_best_clip", _compute_best_clip)
    before = AWQProcessor.__dict__["_compute_best_clip"]
    warnings: list[str] = []
    with _awq_clip.fast_clip_search(warn=warnings.append) as which:
        assert which == _awq_clip.CLIP_SEARCH_STOCK
        assert AWQProcessor.__dict__["_compute_best_clip"] is before
    assert len(warnings) == 1 and why in warnings[0] and "slow" in warnings[0]


def test_out_channel_batch_keeps_the_stock_minimum_and_a_memory_bound():
    assert _awq_clip._out_channel_batch(1536, 512, 9) == 1536  # SmolLM2: the whole layer at once
    assert _awq_clip._out_channel_batch(4096, 512, 224) == 256  # Llama-8B down_proj: the stock 256
    assert _awq_clip._out_channel_batch(192, 512, 9) == 192
    assert _awq_clip._out_channel_batch(28672, 512, 64) * 512 * 64 * 16 <= 1 << 28


# ------------------------------------------------------------------ the planner against measured peak RSS

def _rss_run(src, out, method: str) -> int:
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "qtk", "quantize", str(src), "--method", method, "--group-size", "64",
           "--samples", "4", "--seq-len", "64", "--device", "cpu", "-o", str(out), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["peak_rss_bytes"]  # VmHWM of the quantizing process itself


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nf4", "gptq", "awq"])
def test_planner_predicts_the_measured_peak_rss_within_25_percent(smol_layers, tmp_path, method):
    """A real run (SmolLM2's first 2 layers, real weights) in its own process: the planner's CPU estimate
    (what quantize's pre-check refuses on) is within +-25% of the peak RSS the kernel measured."""
    from qtk.hfload import read_config
    from qtk.plan import quantize_memory, shape_from_config

    src = smol_layers(2)
    measured = _rss_run(src, tmp_path / "out", method)
    shape = shape_from_config(read_config(src, missing="no config"))
    predicted = quantize_memory(shape, method, device="cpu", group_size=64, samples=4, seq_len=64)["host_bytes"]
    assert 0.75 <= predicted / measured <= 1.25, (method, predicted, measured)


def test_nf4_that_cannot_fit_is_refused_before_loading_and_says_it_holds_the_whole_model(qtk, tmp_path):
    """A Llama-3.1-405B-shaped config (810 GB of BF16): NF4 must hold the whole model on the CPU, so
    quantize refuses at once, before reading any weight; the layer-wise methods' estimate grows with depth
    only by the packed 4-bit layers, the whole-model one by more than the BF16 weights."""
    import json

    from safetensors.torch import save_file

    from qtk import errors
    from qtk.plan import quantize_memory, shape_from_config

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
           "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
           "intermediate_size": 53248, "vocab_size": 128256, "torch_dtype": "bfloat16"}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(8, 128, dtype=torch.bfloat16)},
              tmp_path / "m" / "model.safetensors")
    r = qtk("quantize", str(tmp_path / "m"), "--method", "nf4", "--device", "cpu", "-o", str(tmp_path / "out"))
    assert r.exit_code == errors.ResourceError.exit_code, r.output
    assert "holds the whole model" in r.output and "GB" in r.output
    assert not (tmp_path / "out").exists()

    from qtk.plan import FORMATS, weight_bytes

    deep, shallow = shape_from_config(cfg), shape_from_config({**cfg, "num_hidden_layers": 32})
    bf16_growth = weight_bytes(deep, FORMATS["bf16"]) - weight_bytes(shallow, FORMATS["bf16"])
    for method in ("gptq", "awq"):  # one layer at a time: 94 more layers add only their packed 4-bit size
        a = quantize_memory(deep, method, device="cpu", group_size=128)
        b = quantize_memory(shallow, method, device="cpu", group_size=128)
        assert a["holds"] == "one layer" and 0 < a["host_bytes"] - b["host_bytes"] < 0.35 * bf16_growth
    a = quantize_memory(deep, "nf4", device="cpu")
    b = quantize_memory(shallow, "nf4", device="cpu")
    assert a["holds"] == "whole model" and a["host_bytes"] - b["host_bytes"] >= 1.4 * bf16_growth
