"""AWQ through GPTQModel (AutoAWQ is deprecated; GPTQModel and llm-compressor are its successors).

qtk's default is the zero-point (asymmetric) GEMM format that AutoAWQ produced and vLLM users know
(``zero_point: true, version: gemm``); GPTQModel's own default is symmetric. ``--sym`` switches.
On CPU the torch packing backend is used, since GPTQModel's default picks a CUDA kernel.

Speed: GPTQModel 7.6's clip search materializes a [256 x 512 x in_features] product per grid step
and dominated AWQ's time (> 10 min for SmolLM2-135M on 2 CPU cores). qtk runs the same search scored
from per-group Gram matrices (:mod:`qtk.quantize._awq_clip`), version-guarded, and records which search
ran in the provenance (``method_details.awq_clip_search``). The scale search (20 forward passes of each
scaled block over all calibration tokens) then dominates; it runs on micro-batches of several
samples instead of one at a time (:func:`~qtk.quantize.gptq.forward_batch`: same outputs, byte for
byte, measured on SmolLM2) and scores ~14 of the 20 ratios, coarse to fine, with the stock losses
(:mod:`qtk.quantize._awq_scale`; ``awq_scale_search``; ``QTK_AWQ_SCALE_GRID=full``: all 20).
``QTK_AWQ_SEARCH=stock`` runs GPTQModel's own path (stock searches, one sample per forward).
"""

from __future__ import annotations

import logging
import os

from ._awq_clip import fast_clip_search
from ._awq_scale import fast_scale_search
from .base import Method, QuantizeOptions, RunContext
from .gptq import (
    forward_batch,
    gptqmodel_logs_elsewhere,
    heap_trimmed_per_layer,
    prepare_gptqmodel_env,
    quantize_resumable,
    seed_everything,
)

__all__ = ["AWQ"]


class AWQ(Method):
    name = "awq"
    description = "AWQ activation-aware int4, zero-point GEMM format (GPTQModel); transformers + vLLM load it"
    bits = (4,)
    default_sym = False
    distribution = "gptqmodel"
    modules = ("gptqmodel",)
    extra = "gptq"

    def expected_config(self, options: QuantizeOptions) -> dict:
        return {"quant_method": "awq", "bits": options.bits, "group_size": options.group_size,
                "zero_point": not self.sym(options), "version": "gemm"}

    def run(self, ctx: RunContext) -> dict:
        prepare_gptqmodel_env()
        from gptqmodel import BACKEND, AWQConfig, GPTQModel

        o = ctx.options
        cfg = AWQConfig(bits=o.bits, group_size=o.group_size, sym=self.sym(o))
        seed_everything(o.seed)
        model = GPTQModel.load(str(ctx.model.path), cfg, device=ctx.device)
        backend = BACKEND.AWQ_TORCH if ctx.device == "cpu" else BACKEND.AUTO
        notes: list[str] = []
        stock = os.environ.get("QTK_AWQ_SEARCH", "") == "stock"
        batch = 1 if stock else forward_batch(ctx)
        with gptqmodel_logs_elsewhere(), heap_trimmed_per_layer() as heap, \
                fast_clip_search(not stock, warn=notes.append) as clip_search, \
                fast_scale_search(not stock, warn=notes.append,
                                  full_grid=os.environ.get("QTK_AWQ_SCALE_GRID", "") == "full") as scale_search:
            for note in notes:
                logging.getLogger("qtk").warning(note)
            details = quantize_resumable(ctx, model, "awq", batch_size=batch, backend=backend)
        model.save(str(ctx.out))
        return {**details, "awq_clip_search": clip_search, "awq_scale_search": scale_search,
                "forward_batch": batch, "host_heap": heap,
                **({"awq_clip_search_note": notes[0]} if notes else {})}
