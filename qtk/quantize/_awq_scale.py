"""AWQ's scale search with fewer block forwards: the stock losses, the stock pick on almost every group.

GPTQModel 7.6's ``AWQProcessor._compute_best_scale`` tries 20 scale exponents (ratio 0, 0.05 ... 0.95)
for each group of linears and runs the whole inspected block (self-attention, the MLP, or one linear)
over all calibration tokens once per ratio: 20 forwards + 1 reference per group. Once the clip search
is fast, that is most of AWQ's time, and its matrix products already run near the CPU's bf16 peak:
only fewer forwards make it faster.

:func:`compute_best_scale` computes each ratio's loss exactly as the stock code does (same scales,
same in-place pseudo-quantization, same chunked forwards and float32 squared error, same weight
restore), but evaluates the grid coarse to fine (:func:`search_grid`): every second ratio, then both
neighbours of the best three of those, ~14 of 20 forwards. It returns the stock pick whenever the
grid's lowest loss sits next to one of the three best even ratios (always, for a loss with one
minimum; on SmolLM2-135M: 89 of 90 groups, the other one at +1.7 % of that group's loss), and never
a ratio whose loss is worse than one it evaluated. ``QTK_AWQ_SCALE_GRID=full`` evaluates all 20.

:func:`fast_scale_search` installs it on ``AWQProcessor`` for one quantization, only when the installed
GPTQModel's function is the one this was written against (version and source digest).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from ._patch import patched, why_not_replaceable

__all__ = ["SCALE_SEARCH_STOCK", "compute_best_scale", "fast_scale_search", "search_grid", "scale_search_name"]

SCALE_SEARCH_STOCK = "gptqmodel-stock"

N_GRID = 20  # the stock code's grid: ratio = i / 20, i in 0..19
COARSE = 2  # evaluate every second ratio first ...
KEEP = 3  # ... then the neighbours of the best three

# sha256 of inspect.getsource(AWQProcessor._compute_best_scale) in the GPTQModel releases this reproduces
_KNOWN = {"7.6.0": "540ae5618f287350254947aad5fa1a90ccc6c955462fccdb4c264796f9dedb13"}
_SIGNATURE = ("self", "x", "w_mean", "x_mean", "module2inspect", "linears2scale", "fp16_output", "kwargs")
_NEEDS = ("_pseudo_quantize_tensor_into", "_iter_reference_output_chunks", "_iter_module_forward_outputs",
          "_module_forward", "_compute_loss")


def scale_search_name(coarse: int, keep: int) -> str:
    """What provenance records: ``qtk-grid-20`` (all ratios) or ``qtk-coarse-2-best-3`` (coarse to fine)."""
    return f"qtk-grid-{N_GRID}" if coarse <= 1 else f"qtk-coarse-{coarse}-best-{keep}"


def search_grid(loss: Callable[[int], float], n: int = N_GRID, coarse: int = COARSE,
                keep: int = KEEP) -> tuple[int, dict[int, float]]:
    """Index of the lowest loss on the grid 0..n-1, evaluating ``loss`` coarse to fine.

    Every ``coarse``-th index first, then every index strictly between the coarse neighbours of the
    ``keep`` best of those. Ties go to the lowest index (the stock loop's strict ``<`` in ascending
    order); NaN counts as +inf. Returns (best index, {index: loss} of what was evaluated). With
    ``coarse`` 1 it is the full grid, in the stock order."""
    seen: dict[int, float] = {}

    def key(i: int) -> tuple[float, int]:
        v = seen[i]
        return (v if v == v else float("inf"), i)

    def visit(i: int) -> None:
        if 0 <= i < n and i not in seen:
            seen[i] = loss(i)

    coarse = max(1, coarse)
    for i in range(0, n, coarse):
        visit(i)
    if coarse > 1:
        for b in sorted(seen, key=key)[:keep]:
            for j in range(b - coarse + 1, b + coarse):
                visit(j)
    return min(seen, key=key), seen


def compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}, *,
                       coarse: int = COARSE, keep: int = KEEP):
    """Drop-in for ``AWQProcessor._compute_best_scale`` (GPTQModel 7.6): same arguments and result
    (best scales on the CPU, their loss); each evaluated ratio's loss is computed by the stock code's
    steps; ``coarse`` 1 evaluates the whole grid, as the stock code does. Long because it keeps the stock
    function's steps in their order (master copy, device, the ratio loop, restore), so the two read side by side."""
    import torch

    # a float32 master copy on the CPU; copy=True: for a float32 CPU layer the stock ``.to(torch.float32)
    # .cpu()`` is the weight itself, so GPTQModel 7.6 "restores" each ratio's quantized weights onto
    # themselves and scores every later ratio on weights already quantized (qtk's copy is a copy)
    orig_weights_cpu = {fc: fc.weight.detach().to(torch.float32, copy=True).cpu().contiguous()
                        for fc in linears2scale}
    try:
        device = next(module2inspect.parameters()).device
    except Exception:  # StopIteration and whatever else the stock code tolerates
        device = x.device
    x_mean = x_mean.view(-1).to(device)
    w_mean = w_mean.view(-1).to(device)
    prev_scale_hint = getattr(self._scale_context, "prev_scale", None)
    if prev_scale_hint is not None:
        w_mean = w_mean * float(prev_scale_hint)
    use_chunked_scale_search = getattr(self.qcfg, "scale_search_chunked_activations", True)
    candidates: dict[int, object] = {}

    def restore() -> None:
        for fc in linears2scale:
            fc.weight.copy_(orig_weights_cpu[fc].to(device=fc.weight.device, dtype=fc.weight.dtype))

    def loss_at(i: int) -> float:
        ratio = i / N_GRID
        if self.duo_scaling:
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        scales_view = scales.view(1, -1).to(device)
        scales[torch.isinf(scales)] = 1
        scales[torch.isnan(scales)] = 1
        for fc in linears2scale:
            fc.weight.mul_(scales_view)
            self._pseudo_quantize_tensor_into(fc.weight, fc.weight)
            fc.weight.div_(scales_view)
        if use_chunked_scale_search:
            total_loss, total_elements = 0.0, 0
            for ref_chunk, int_w_output in zip(self._iter_reference_output_chunks(x, fp16_output),
                                               self._iter_module_forward_outputs(x, module2inspect, kwargs)):
                int_w_output = int_w_output.clip(torch.finfo(int_w_output.dtype).min, torch.finfo(int_w_output.dtype).max)
                ref_chunk = ref_chunk.to(device=int_w_output.device, dtype=int_w_output.dtype)
                diff = (ref_chunk - int_w_output).float()
                total_loss += diff.pow(2).sum().item()
                total_elements += diff.numel()
            loss = total_loss / max(total_elements, 1)
        else:
            int_w_output = self._module_forward(x, module2inspect, kwargs)
            int_w_output = int_w_output.clip(torch.finfo(int_w_output.dtype).min, torch.finfo(int_w_output.dtype).max)
            loss = self._compute_loss(fp16_output, int_w_output, device)
        if loss < float("inf"):  # the stock loop never picks a NaN or infinite loss
            candidates[i] = scales.clone()
        restore()
        return loss if loss < float("inf") else float("inf")

    try:
        best, seen = search_grid(loss_at, N_GRID, coarse, keep)
    finally:
        restore()
        orig_weights_cpu.clear()
    if best not in candidates:
        raise RuntimeError(f"AWQ scale search: no finite loss among the ratios tried ({seen})")
    best_scales = candidates[best]
    assert torch.isnan(best_scales).sum() == 0, best_scales
    return best_scales.detach().cpu(), seen[best]


@contextlib.contextmanager
def fast_scale_search(enabled: bool = True, warn: Callable[[str], None] = lambda s: None, *,
                      full_grid: bool = False) -> Iterator[str]:
    """Use :func:`compute_best_scale` in GPTQModel's AWQ for the duration of the block.

    Yields what runs (for provenance): ``qtk-coarse-2-best-3``, ``qtk-grid-20`` (``full_grid``: the
    stock grid through qtk's code) or :data:`SCALE_SEARCH_STOCK` (disabled, or the installed GPTQModel
    is not the checked one: ``warn`` says why)."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    if not enabled:
        yield SCALE_SEARCH_STOCK
        return
    reason = why_not_replaceable(AWQProcessor, "_compute_best_scale", _SIGNATURE, _KNOWN, _NEEDS, "scale search")
    if reason:
        warn(f"AWQ: using GPTQModel's own scale search (all 20 ratios): {reason}.")
        yield SCALE_SEARCH_STOCK
        return
    coarse = 1 if full_grid else COARSE

    def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
        return compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs,
                                  coarse=coarse, keep=KEEP)

    with patched(AWQProcessor, _compute_best_scale=_compute_best_scale):
        yield scale_search_name(coarse, KEEP)
