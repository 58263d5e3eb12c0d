"""AWQ's clip search without the giant temporary: the same search, the same numbers, ~100x faster.

GPTQModel 7.6's ``AWQProcessor._compute_best_clip`` scores each of 10 shrink ratios of a layer's
per-group max by ``(input_feat * w).sum(-1)``: it broadcasts [1, tokens, groups, group_size] against
[256 out-ch, 1, groups, group_size], so every step materializes a 256 x 512 x in_features tensor
(150 MB for SmolLM2's MLP on CPU, 3.7 GB for Llama-8B's down_proj on a GPU) only to sum it away.

:func:`compute_best_clip` runs the same search and scores each candidate by the same quantity, the
mean over the sampled tokens of the squared output error of each (out-channel, group), but as
``d^T G d / T`` with ``G = X^T X`` per group (group_size x group_size, computed once per layer) and
``d`` = quantized - original weights: group_size / tokens of the products (1/8 for group 64 and the
stock 512 tokens) and no [tokens x out-ch] temporaries. Where a group is wider than the sampled
tokens (group_size -1 on a wide layer) it uses the token products instead, as a batched matrix
product over the groups (``torch.bmm``).

Numerics: sums in float32 (the stock path rounds every bf16 product to bf16 before summing, so this
is the more exact of the two); the error is cast to the dtype the stock error has before the stock
strict ``<`` comparison (its tie rule: less clipping on a tie); token subsampling, out-channel
batching and the pseudo-quantizer are the stock code's. On float32 inputs the two pick the same clip
(tests); on bf16 SmolLM2-shaped layers ~98 % of (channel, group) picks agree, as before.

:func:`fast_clip_search` installs it on ``AWQProcessor`` for the duration of one quantization only,
and only when the installed GPTQModel's function is the one this was written against (version and
source digest); otherwise the stock path runs and the caller is told why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from ._patch import patched, why_not_replaceable

__all__ = ["CLIP_SEARCH_FAST", "CLIP_SEARCH_STOCK", "compute_best_clip", "fast_clip_search"]

CLIP_SEARCH_FAST = "qtk-gram"
CLIP_SEARCH_STOCK = "gptqmodel-stock"

# sha256 of inspect.getsource(AWQProcessor._compute_best_clip) in the GPTQModel releases this replaces
_KNOWN = {"7.6.0": "1a4e491ca33691b09e87b4cd49ef43a2cc0d4f0d9ca4e8e52edb301eac1a07e7"}
_SIGNATURE = ("self", "w", "input_feat", "n_grid", "max_shrink", "n_sample_token")


def _group_dot(x_gtk, w_cgk, out_dtype):
    """sum_k x[g, t, k] * w[c, g, k] -> [g, t, c] with float32 accumulation, cast to ``out_dtype``.

    ``x_gtk`` is float32 [groups, tokens, group_size]; ``w_cgk`` any float dtype [out, groups, group_size]."""
    import torch

    return torch.bmm(x_gtk, w_cgk.to(torch.float32).permute(1, 2, 0)).to(out_dtype)


def _out_channel_batch(out_features: int, tokens: int, groups: int, budget: int = 1 << 28) -> int:
    """Out-channels scored at once: at least the stock code's batch (256, else 64), more while the
    float32 products stay under ``budget`` bytes. Results are per channel, so the batch size changes
    only speed and memory, never which clip wins."""
    stock = 256 if out_features % 256 == 0 else 64
    per_channel = tokens * groups * 4 * 4  # org_out, cur_out, their difference, the fp32 product
    return max(1, min(out_features, max(stock, budget // max(per_channel, 1))))


def _gram_errors(gram_gkk, delta_cgk, n_token: int):
    """mean_t (sum_k x[g, t, k] * d[c, g, k])^2 = d^T (X^T X) d / T per (c, g), in float32: [c, g].

    ``gram_gkk`` is X^T X per group (float32 [groups, k, k]); ``delta_cgk`` float32 [out, groups, k]."""
    import torch

    d = delta_cgk.permute(1, 0, 2)  # [g, c, k]
    return torch.bmm(d, gram_gkk).mul_(d).sum(-1).t() / n_token


def compute_best_clip(self, w, input_feat, n_grid: int = 20, max_shrink: float = 0.5, n_sample_token: int = 512):
    """Drop-in for ``AWQProcessor._compute_best_clip`` (GPTQModel 7.6): same arguments, same search.

    Returns the best max value per (out-channel, group): [out, n_group, 1], in ``w``'s dtype.

    The error of a clipped, quantized group is ``mean_t (x_t . (q - w))^2``, the stock code's
    ``(cur_out - org_out).pow(2).mean()``; with ``k`` = group size <= the sampled tokens it is computed
    as ``d^T G d / T`` with ``G = X^T X`` per group (k x k, once per layer), ``d = q - w``: k/T of the
    products, and no [tokens x out] temporaries. It is cast to the dtype the stock error has (bf16 for a
    bf16 layer) before the stock ``<`` comparison, so the stock tie rule (less clipping on a tie) holds."""
    import torch

    with torch.inference_mode():
        assert w.dim() == 2
        org_w_shape = w.shape
        group_size = self.qcfg.group_size if self.qcfg.group_size > 0 else org_w_shape[1]
        input_feat = input_feat.view(-1, input_feat.shape[-1])
        input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group_size)
        step_size = max(1, input_feat.shape[1] // n_sample_token)
        input_feat = input_feat[:, ::step_size]

        w_all = w.reshape(org_w_shape[0], 1, -1, group_size)
        device = w_all.device
        out_dtype = torch.promote_types(input_feat.dtype, w_all.dtype)  # what `input_feat * w` would be
        x = input_feat[0].to(device=device, dtype=torch.float32).permute(1, 0, 2).contiguous()  # [g, t, k]
        n_group, n_token = x.shape[0], x.shape[1]
        gram = torch.bmm(x.transpose(1, 2), x) if group_size <= n_token else None  # [g, k, k]
        if gram is not None:  # per weight: 3 float32 temporaries (w, q - w, its product with G), 2 bf16 scratch
            oc_batch = max(1, min(org_w_shape[0], (1 << 27) // max(org_w_shape[1] * 16, 1)))
        else:
            oc_batch = _out_channel_batch(org_w_shape[0], n_token, n_group)
        scratch_clamp = torch.empty_like(w_all[:oc_batch])
        scratch_quant = torch.empty_like(scratch_clamp)
        best_max_val_all = []
        for start in range(0, org_w_shape[0], oc_batch):
            wb = w_all[start: start + oc_batch]
            n = wb.shape[0]
            org_max_val = wb.abs().amax(dim=-1, keepdim=True)  # [n, 1, n_group, 1]
            best_max_val = org_max_val.clone()
            min_errs = torch.ones_like(org_max_val) * 1e9
            clamp_slice = scratch_clamp[:n]
            quant_slice = scratch_quant[:n]
            w32 = wb[:, 0].to(torch.float32)
            org_out = _group_dot(x, wb[:, 0], out_dtype) if gram is None else None  # [n_group, n_token, n]
            for i_s in range(int(max_shrink * n_grid)):
                max_val = org_max_val * (1 - i_s / n_grid)
                torch.clamp(wb, -max_val, max_val, out=clamp_slice)
                self._pseudo_quantize_tensor_into(clamp_slice, quant_slice)
                if gram is not None:
                    err = _gram_errors(gram, quant_slice[:, 0].to(torch.float32).sub_(w32), n_token)
                    err = err.to(out_dtype).reshape(min_errs.shape)
                else:
                    cur_out = _group_dot(x, quant_slice[:, 0], out_dtype)
                    # mean over tokens, as the stock code: [n_group, n] -> [n, 1, n_group, 1]
                    err = (cur_out - org_out).pow(2).mean(dim=1).t().reshape(min_errs.shape)
                cur_best_idx = err < min_errs
                min_errs[cur_best_idx] = err[cur_best_idx]
                best_max_val[cur_best_idx] = max_val[cur_best_idx]
            best_max_val_all.append(best_max_val)
        return torch.cat(best_max_val_all, dim=0).squeeze(1)


def _why_not(processor_cls) -> str | None:
    """None when the installed GPTQModel's clip search is the one :func:`compute_best_clip` reproduces."""
    return why_not_replaceable(processor_cls, "_compute_best_clip", _SIGNATURE, _KNOWN,
                               needs=("_pseudo_quantize_tensor_into",), what="clip search")


@contextlib.contextmanager
def fast_clip_search(enabled: bool = True, warn: Callable[[str], None] = lambda s: None) -> Iterator[str]:
    """Use :func:`compute_best_clip` in GPTQModel's AWQ for the duration of the block.

    Yields what runs: :data:`CLIP_SEARCH_FAST`, or :data:`CLIP_SEARCH_STOCK` (disabled, or the installed
    GPTQModel is not the checked one: ``warn`` says why)."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    if not enabled:
        yield CLIP_SEARCH_STOCK
        return
    reason = _why_not(AWQProcessor)
    if reason:
        warn(f"AWQ: using GPTQModel's own clip search, which is slow on large layers: {reason}.")
        yield CLIP_SEARCH_STOCK
        return
    with patched(AWQProcessor, _compute_best_clip=compute_best_clip):
        yield CLIP_SEARCH_FAST
