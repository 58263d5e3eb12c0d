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
