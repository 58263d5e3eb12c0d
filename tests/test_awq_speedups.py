"""AWQ's faster searches against GPTQModel's own code: the scale search (coarse to fine over the stock
losses) and the clip search (per-group Gram matrices), on small random layers."""

from __future__ import annotations

import math
import threading
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtk.quantize import _awq_scale

torch = pytest.importorskip("torch")
pytest.importorskip("gptqmodel")

from qtk.quantize import _awq_clip  # noqa: E402


# ------------------------------------------------------------------------------------ the grid search


def _first_argmin(losses: list[float]) -> int:
    """The stock loop: ascending ratios, strict ``<`` against +inf (NaN never wins)."""
    best, best_loss = -1, float("inf")
    for i, v in enumerate(losses):
        if v < best_loss:
            best, best_loss = i, v
    return best


finite = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(finite, st.just(float("nan")), st.just(float("inf"))), min_size=20, max_size=20),
       st.integers(1, 5), st.integers(1, 4))
def test_search_grid_returns_the_lowest_evaluated_loss(losses, coarse, keep):
    calls: list[int] = []

    def loss(i):
        calls.append(i)
        return losses[i]

    best, seen = _awq_scale.search_grid(loss, 20, coarse, keep)
    assert len(calls) == len(set(calls)) == len(seen)  # each ratio's forwards run at most once
    assert all(seen[i] is losses[i] or seen[i] == losses[i] for i in seen)
    assert set(range(0, 20, coarse)) <= set(seen)
    evaluated = [losses[i] if i in seen else float("inf") for i in range(20)]
    if any(v < float("inf") for v in evaluated):
        assert best == _first_argmin(evaluated)
    if coarse == 1:
        assert sorted(seen) == list(range(20)) and calls == list(range(20))  # the stock order


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 19), st.lists(st.floats(min_value=1e-3, max_value=10.0), min_size=19, max_size=19),
       st.integers(2, 4), st.integers(1, 3))
def test_search_grid_finds_the_stock_pick_of_a_loss_with_one_minimum(m, steps, coarse, keep):
    """Strictly decreasing to index m, strictly increasing after it: the coarse-to-fine search finds m."""
    losses = [0.0] * 20
    losses[m] = 1.0
    for i in range(m - 1, -1, -1):
        losses[i] = losses[i + 1] + steps[i]
    for i in range(m + 1, 20):
        losses[i] = losses[i - 1] + steps[i - 1]
    best, seen = _awq_scale.search_grid(lambda i: losses[i], 20, coarse, keep)
    assert best == m == _first_argmin(losses)
    assert len(seen) < 20 or coarse == 1


def test_search_grid_default_cost():
    _, seen = _awq_scale.search_grid(lambda i: (i - 7) ** 2)
    assert len(seen) == 10 + 4  # evens, then 5/7/9 and 3 (neighbours of 6, 8, 4)


# ------------------------------------------------------------------------- the scale search, end to end


class _MLP(torch.nn.Module):
    """A Llama MLP: what AWQ inspects for the gate/up group."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _processor(group_size: int = 32, sym: bool = False, batch: int = 2):
    """A real AWQProcessor with only the attributes the scale search reads (no model, no calibration)."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    proc = object.__new__(AWQProcessor)
    proc.qcfg = types.SimpleNamespace(group_size=group_size, sym=sym, bits=4, scale_search_chunked_activations=True)
    proc.duo_scaling = True
    proc.max_chunk_memory = 1 << 30
    proc._scale_context = threading.local()
    proc._quant_batch_size = batch
    proc.gptq_model = types.SimpleNamespace(rotary_embedding=None)
    proc.model = torch.nn.Module()
    return proc


def _scale_case(dtype, seed: int, single_linear: bool):
    g = torch.Generator().manual_seed(seed)
    mlp = _MLP(64, 96)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
            lin.weight[:, ::9] *= 5  # outlier input channels, which the scales protect
    mlp = mlp.to(dtype)
    if single_linear:  # the down_proj group: the linear itself is inspected
        module, layers = mlp.down_proj, [mlp.down_proj]
        x = torch.randn(5, 16, 96, generator=g).to(dtype)
    else:
        module, layers = mlp, [mlp.gate_proj, mlp.up_proj]
        x = torch.randn(5, 16, 64, generator=g)
        x[..., ::7] *= 6
        x = x.to(dtype)
    x_mean = x.abs().view(-1, x.shape[-1]).float().mean(0).to(dtype)
    from gptqmodel.looper.awq_processor import _compute_awq_weight_mean

    w_mean = _compute_awq_weight_mean(layers, 32)
    return module, layers, x, x_mean, w_mean


def _run(fn, proc, case):
    module, layers, x, x_mean, w_mean = case
    before = [lin.weight.detach().clone() for lin in layers]
    with torch.inference_mode():
        ref = [o.clip(torch.finfo(o.dtype).min, torch.finfo(o.dtype).max).detach().cpu()
               for o in proc._iter_module_forward_outputs(x, module, {})]
        scales, loss = fn(proc, x, w_mean, x_mean, module, layers, ref, {})
    for lin, w in zip(layers, before):  # the weights are left as they were
        assert torch.equal(lin.weight, w)
    return scales, loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("single_linear", [False, True])
def test_scale_search_over_the_full_grid_is_the_stock_search(dtype, single_linear):
    from gptqmodel.looper.awq_processor import AWQProcessor

    proc = _processor()
    case = _scale_case(dtype, seed=1, single_linear=single_linear)
    stock_scales, stock_loss = _run(AWQProcessor._compute_best_scale, proc, case)

    def ours(*a):
        return _awq_scale.compute_best_scale(*a, coarse=1)

    scales, loss = _run(ours, proc, case)
    assert torch.equal(scales, stock_scales) and loss == stock_loss


def test_scale_search_restores_a_float32_layer_that_the_stock_search_leaves_quantized():
    """GPTQModel 7.6 keeps its "master copy" as ``weight.to(torch.float32).cpu()``: for a float32 CPU
    layer that is the weight itself, so the stock search leaves it altered (and scores each later
    ratio on already-quantized weights). qtk's copy is a copy."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    proc = _processor()
    module, layers, x, x_mean, w_mean = case = _scale_case(torch.float32, seed=1, single_linear=True)
    before = layers[0].weight.detach().clone()
    _run(lambda *a: _awq_scale.compute_best_scale(*a, coarse=1), proc, case)  # asserts the weights are restored
    with torch.inference_mode():
        ref = module(x)  # a tensor: split into the forward batches
        AWQProcessor._compute_best_scale(proc, x, w_mean, x_mean, module, layers, ref, {})
    assert not torch.equal(layers[0].weight, before)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_coarse_scale_search_scores_ratios_as_the_stock_code_and_picks_their_minimum(monkeypatch, seed):
    proc = _processor()
    case = _scale_case(torch.bfloat16, seed=seed, single_linear=False)
    grids: list[dict[int, float]] = []
    search = _awq_scale.search_grid

    def recording(loss, n, coarse, keep):
        best, seen = search(loss, n, coarse, keep)
        grids.append(dict(seen))
        return best, seen

    monkeypatch.setattr(_awq_scale, "search_grid", recording)
    full_scales, full_loss = _run(lambda *a: _awq_scale.compute_best_scale(*a, coarse=1), proc, case)
    scales, loss = _run(_awq_scale.compute_best_scale, proc, case)
    full, coarse = grids
    assert len(full) == 20 and len(coarse) < 20
    assert all(coarse[i] == full[i] for i in coarse)  # each ratio's loss, bit for bit
    assert loss == min(coarse.values()) >= full_loss
    if min(coarse, key=lambda i: (coarse[i], i)) == min(full, key=lambda i: (full[i], i)):
        assert torch.equal(scales, full_scales)


def test_scale_search_raises_when_no_ratio_has_a_finite_loss():
    proc = _processor()
    module, layers, x, x_mean, w_mean = _scale_case(torch.float32, seed=1, single_linear=True)
    ref = torch.full((5, 16, 64), float("nan"))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no finite loss"):
        _awq_scale.compute_best_scale(proc, x, w_mean, x_mean, module, layers, ref, {})


def test_fast_scale_search_patches_for_one_run_and_restores():
    from gptqmodel.looper.awq_processor import AWQProcessor

    stock = AWQProcessor.__dict__["_compute_best_scale"]
    with _awq_scale.fast_scale_search() as which:
        assert which == "qtk-coarse-2-best-3"
        assert AWQProcessor.__dict__["_compute_best_scale"] is not stock
    assert AWQProcessor.__dict__["_compute_best_scale"] is stock
    with _awq_scale.fast_scale_search(full_grid=True) as which:
        assert which == "qtk-grid-20"
    with pytest.raises(RuntimeError), _awq_scale.fast_scale_search():
        raise RuntimeError("quantization failed")
    assert AWQProcessor.__dict__["_compute_best_scale"] is stock
    with _awq_scale.fast_scale_search(enabled=False) as which:
        assert which == _awq_scale.SCALE_SEARCH_STOCK
        assert AWQProcessor.__dict__["_compute_best_scale"] is stock


@pytest.mark.parametrize("change, why", [
    ("version", "not a version qtk's scale search was checked against"),
    ("source", "differs from the one qtk's replacement reproduces"),
    ("signature", "takes"),
    ("missing", "has no _iter_reference_output_chunks"),
])
def test_a_changed_backend_runs_the_stock_scale_search_with_a_warning(monkeypatch, change, why):
    from gptqmodel.looper.awq_processor import AWQProcessor

    if change == "version":
        monkeypatch.setattr(_awq_scale, "_KNOWN", {"0.0.1": "0" * 64})
    elif change == "source":
        monkeypatch.setattr(_awq_scale, "_KNOWN", {k: "0" * 64 for k in _awq_scale._KNOWN})
    elif change == "signature":
        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={},
                                n_grid=20):
            raise AssertionError("not called")

        monkeypatch.setattr(AWQProcessor, "_compute_best_scale", _compute_best_scale)
    else:
        monkeypatch.delattr(AWQProcessor, "_iter_reference_output_chunks")
    before = AWQProcessor.__dict__["_compute_best_scale"]
    warnings: list[str] = []
    with _awq_scale.fast_scale_search(warn=warnings.append) as which:
        assert which == _awq_scale.SCALE_SEARCH_STOCK
        assert AWQProcessor.__dict__["_compute_best_scale"] is before
    assert len(warnings) == 1 and why in warnings[0] and "scale search" in warnings[0]


# ---------------------------------------------------------------------------------- the clip search


def _clip_processor(group_size: int, sym: bool = False):
    from gptqmodel.looper.awq_processor import AWQProcessor

    self = types.SimpleNamespace(qcfg=types.SimpleNamespace(group_size=group_size, sym=sym, bits=4))
    self._pseudo_quantize_tensor_into = types.MethodType(AWQProcessor._pseudo_quantize_tensor_into, self)
    return self


@pytest.mark.parametrize("out_features, in_features, group_size, tokens", [
    (128, 64, 32, 200),  # groups smaller than the sampled tokens: the Gram path
    (64, 256, -1, 100),  # one group per row, wider than the tokens: the token-product path
])
def test_clip_search_paths_equal_the_stock_search_in_float32(out_features, in_features, group_size, tokens):
    from gptqmodel.looper.awq_processor import AWQProcessor

    g = torch.Generator().manual_seed(out_features)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    w[:, ::7] *= 4
    x = torch.randn(1, tokens, in_features, generator=g)
    proc = _clip_processor(group_size)
    assert torch.equal(_awq_clip.compute_best_clip(proc, w, x), AWQProcessor._compute_best_clip(proc, w, x))


def test_gram_errors_are_the_mean_squared_output_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 16, generator=g, dtype=torch.float64)  # [groups, tokens, k]
    d = torch.randn(7, 3, 16, generator=g, dtype=torch.float64)  # [out, groups, k]
    direct = torch.einsum("gtk,cgk->cgt", x, d).pow(2).mean(-1)
    gram = torch.bmm(x.transpose(1, 2), x)
    assert torch.allclose(_awq_clip._gram_errors(gram, d, 50), direct, rtol=1e-12)
    assert math.isclose(float(direct.sum()), float(_awq_clip._gram_errors(gram, d, 50).sum()), rel_tol=1e-12)
