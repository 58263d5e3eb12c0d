"""INT8 W8A8 for vLLM: int8 weights, symmetric, one scale per output channel; input activations
quantized to int8 dynamically per token at run time (compressed-tensors' W8A8 scheme), with optional
SmoothQuant smoothing (Xiao et al., 2023) from the calibration set. See :mod:`qtk.quantize._compressed`
for the pipeline.

Smoothing moves part of the activations' outlier channels into the weights, whose per-channel scales
absorb them better. For each normalization whose output feeds linears only (Llama: ``input_layernorm``
-> q/k/v, ``post_attention_layernorm`` -> gate/up), per input channel j::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

(``max|X_j|`` over every calibration token, ``max|W_j|`` over the rows of all the linears that read that
norm; ``alpha`` the migration strength, ``--smooth-alpha``, default 0.5), then ``norm.weight /= s`` and
``W[:, j] *= s``. The network computes the same function; only what gets quantized changes. qtk checks
that: every decoder layer, replayed alone in FP32 on the input it got from a calibration sample, must
compute the same output before and after folding (relative error below 1e-4 for an FP32 model, 5e-2 for
a BF16/FP16 one, whose scaled weights are rounded), else the run stops and names ``--no-smooth``.

Which norm feeds which linears is found, not assumed from module names: on one short sample each
linear's input tensor is paired with the norm output it *is*. A norm is folded only when its output
scales with its parameters (RMSNorm, LayerNorm: yes; Gemma's ``(1 + w)`` RMSNorm: no) and none of its
readers stays unquantized (``lm_head``); the others are skipped and listed in provenance.
"""

from __future__ import annotations

from ._compressed import IGNORE, CompressedMethod
from .base import QuantizeOptions, RunContext
from .gptq import heap_trimmed_per_layer

__all__ = ["W8A8", "smooth"]

_PAIRING_TOKENS = 32  # tokens of the first sample that the pairing pass runs
_CHECK_TOKENS = 64  # tokens of the first sample each decoder layer is replayed on, before/after folding
# of a decoder layer's output, replayed in FP32 on the same input before/after folding: FP32 models ~1e-6;
# BF16/FP16 ones round the scaled weights to their half type (SmolLM2 in BF16: 6e-3 at worst over its 30 layers);
# a norm whose output also feeds something unfolded is off by O(0.1-1)
_MAX_REL_ERROR = {"float32": 1e-4, "half": 5e-2}


class W8A8(CompressedMethod):
    name = "w8a8"
    description = ("INT8 weights with per-channel scales, dynamic per-token INT8 activations "
                   "(compressed-tensors W8A8), SmoothQuant-smoothed from calibration; vLLM and transformers load it")
    needs_calibration = True  # for smoothing; --no-smooth reads none (calibrates())
    preset = "W8A8"
    format = "int-quantized"
    weight_type = "int"

    def calibrates(self, options: QuantizeOptions) -> bool:
        return options.smooth

    def option_problems(self, options: QuantizeOptions) -> dict[str, str]:
        out = super().option_problems(options)
        if not options.smooth:  # reads no calibration samples
            out = {k: v for k, v in out.items() if k not in ("samples", "seq_len")}
        if not 0.0 <= options.smooth_alpha <= 1.0:
            out["smooth_alpha"] = f"must be between 0 and 1 (got {options.smooth_alpha})"
        return out

    def prepare(self, model, ctx: RunContext) -> dict:
        if not ctx.options.smooth:
            return {"smoothing": "off"}
        return {"smoothing": smooth(model, ctx.samples.input_ids, ctx.options.smooth_alpha,
                                    tokens_per_forward=8192)}


def smooth(model, samples: list[list[int]], alpha: float, *, tokens_per_forward: int = 8192) -> dict:
    """SmoothQuant on ``model`` in place (see the module docstring); returns what it did."""
    import torch

    first = torch.tensor([samples[0]], device=model.device)
    groups, skipped = find_groups(model, first[:, :_PAIRING_TOKENS])
    if not groups:
        return {"alpha": alpha, "groups": 0, "skipped": skipped}
    calls = layer_calls(model, first[:, :_CHECK_TOKENS])
    before = [replay_fp32(c) for c in calls]
    maxima = activation_maxima(model, list(groups), samples, tokens_per_forward)
    ratios = fold(model, groups, maxima, alpha)
    rel = max(((replay_fp32(c) - b).norm() / b.norm().clamp(min=1e-12)).item() for c, b in zip(calls, before))
    limit = _MAX_REL_ERROR["float32" if model.dtype == torch.float32 else "half"]
    if not rel < limit:
        from .. import errors

        raise errors.QuantizeError(
            f"Smoothing changed what a decoder layer computes (relative error {rel:.2e}, limit {limit:g}): a "
            "normalization's output feeds more than the linears qtk folded it into.",
            hint="Quantize this architecture with --no-smooth, and please report it.")
    return {"alpha": alpha, "groups": len(groups), "linears": sum(len(v) for v in groups.values()),
            "skipped": skipped, "tokens": sum(len(s) for s in samples), "layer_rel_error": float(f"{rel:.3g}"),
            "max_scale_spread": float(f"{max(ratios):.4g}")}


def layer_calls(model, ids) -> list[tuple]:
    """``(layer, args, kwargs)`` of each decoder layer's call on ``ids`` (what the model passed it: hidden
    states, position embeddings, mask), to replay each layer alone before and after folding."""
    import torch

    calls: list[tuple] = []

    def record(module, args, kwargs):
        if not any(c[0] is module for c in calls):
            calls.append((module, args, dict(kwargs)))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
               if type(m).__name__.endswith("DecoderLayer")]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        from .. import errors

        raise errors.QuantizeError(f"{type(model).__name__} has no *DecoderLayer modules: qtk cannot check smoothing.",
                                   hint="Quantize it with --no-smooth.")
    return calls


def replay_fp32(call) -> object:
    """The layer's output on its recorded inputs, computed in FP32: exact to ~1e-6 whatever the model's dtype,
    so the check sees only what folding changed (the layer is cast up and back: BF16/FP16 -> FP32 -> BF16/FP16
    is lossless; each parameter and buffer gets its own dtype back)."""
    import torch

    module, args, kwargs = call

    def up(v):
        if torch.is_tensor(v):
            return v.float() if v.is_floating_point() else v
        return tuple(up(x) for x in v) if isinstance(v, tuple) else v

    tensors = [*module.parameters(), *module.buffers()]
    dtypes = [t.dtype for t in tensors]
    with torch.no_grad():
        for t in tensors:
            t.data = t.data.float() if t.is_floating_point() else t.data
        try:
            out = module(*up(args), **{k: up(v) for k, v in kwargs.items()})
        finally:
            for t, d in zip(tensors, dtypes):
                t.data = t.data.to(d)
    return (out[0] if isinstance(out, tuple) else out).float()


def find_groups(model, ids) -> tuple[dict[str, list[str]], list[str]]:
    """``{norm name: [names of the linears that read its output]}`` from one forward pass on ``ids``,
    and the norms found but not foldable (with why)."""
    import torch

    norms = {n: m for n, m in model.named_modules() if _is_norm(m)}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    produced: dict[int, tuple[str, object]] = {}  # id(output) -> (norm name, the output: kept to compare identity)
    readers: dict[str, list[str]] = {}

    def on_norm(name):
        return lambda _m, _args, out: produced.__setitem__(id(out), (name, out)) if torch.is_tensor(out) else None

    def on_linear(name):
        def hook(_m, args):
            hit = produced.get(id(args[0])) if args else None
            if hit is not None and hit[1] is args[0]:
                readers.setdefault(hit[0], []).append(name)
        return hook

    handles = [m.register_forward_hook(on_norm(n)) for n, m in norms.items()]
    handles += [m.register_forward_pre_hook(on_linear(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    produced.clear()
    groups, skipped = {}, []
    for norm, names in readers.items():
        if any(n.split(".")[-1] in IGNORE for n in names):
            skipped.append(f"{norm}: read by {', '.join(n for n in names if n.split('.')[-1] in IGNORE)}, kept 16-bit")
        elif not _scales_with_parameters(norms[norm]):
            skipped.append(f"{norm}: {type(norms[norm]).__name__} output does not scale with its weight")
        else:
            groups[norm] = sorted(set(names), key=names.index)
    return groups, skipped


def _is_norm(module) -> bool:
    import torch

    w = getattr(module, "weight", None)
    return (not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and not any(True for _ in module.children())
            and isinstance(w, torch.Tensor) and w.dim() == 1)


def _scales_with_parameters(norm) -> bool:
    """norm(x) with every parameter doubled == 2 * norm(x): then dividing them by s divides the output by s."""
    import torch

    params = [p for p in norm.parameters(recurse=False)]
    x = torch.randn(4, norm.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(norm.weight)
    with torch.no_grad():
        y = norm(x).float()
        for p in params:
            p.mul_(2)
        try:
            y2 = norm(x).float()
        finally:
            for p in params:
                p.div_(2)
    return bool(((y2 - 2 * y).norm() / (2 * y).norm().clamp(min=1e-12)).item() < 1e-2)


def activation_maxima(model, norms: list[str], samples: list[list[int]], tokens_per_forward: int) -> dict:
    """Per channel, the largest absolute value each norm in ``norms`` outputs over every calibration token
    (float32). The base model runs without its head (no [tokens x vocab] logits)."""
    import torch

    modules = dict(model.named_modules())
    maxima: dict[str, torch.Tensor] = {}

    def on_norm(name):
        def hook(_m, _args, out):
            m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
        return hook

    handles = [modules[n].register_forward_hook(on_norm(n)) for n in norms]
    batch = max(1, tokens_per_forward // max(len(samples[0]), 1))
    try:
        with torch.no_grad():
            for i in range(0, len(samples), batch):
                # freed activations back to the OS at each layer: glibc otherwise keeps them in its arenas, and
                # the peak grew by ~0.8 GB over 8 batches of 8k tokens on SmolLM2-135M (1.35 -> 2.1 GB)
                with heap_trimmed_per_layer():
                    model.base_model(input_ids=torch.tensor(samples[i : i + batch], device=model.device),
                                     use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return maxima


def fold(model, groups: dict[str, list[str]], maxima: dict, alpha: float) -> list[float]:
    """Divide each norm's parameters by s and multiply its readers' input columns by s (FP32 arithmetic,
    stored in the model's dtype). Returns, per norm, max(s) / min(s)."""
    import torch

    modules = dict(model.named_modules())
    spreads = []
    with torch.no_grad():
        for norm_name, readers in groups.items():
            norm, lins = modules[norm_name], [modules[n] for n in readers]
            w_max = torch.cat([m.weight.abs().float() for m in lins], 0).amax(0)
            x_max = maxima[norm_name].to(w_max.device).clamp(min=1e-5)
            s = (x_max.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
            s = torch.where(w_max > 0, s, torch.ones_like(s))  # a dead input channel stays as it is
            for p in norm.parameters(recurse=False):
                p.copy_((p.float() / s).to(p.dtype))
            for m in lins:
                m.weight.copy_((m.weight.float() * s).to(m.weight.dtype))
            spreads.append((s.max() / s.min()).item())
    return spreads
