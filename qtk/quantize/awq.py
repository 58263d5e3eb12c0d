"""AWQ through GPTQModel (AutoAWQ is deprecated; GPTQModel and llm-compressor are its successors).

qtk's default is the zero-point (asymmetric) GEMM format that AutoAWQ produced and vLLM users know
(``zero_point: true, version: gemm``); GPTQModel's own default is symmetric. ``--sym`` switches.
On CPU the torch packing backend is used, since GPTQModel's default picks a CUDA kernel.
"""

from __future__ import annotations

from .base import Method, QuantizeOptions, RunContext
from .gptq import calibration_rows, gptqmodel_logs_elsewhere, prepare_gptqmodel_env, seed_everything

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

    def run(self, ctx: RunContext) -> None:
        prepare_gptqmodel_env()
        from gptqmodel import BACKEND, AWQConfig, GPTQModel

        o = ctx.options
        cfg = AWQConfig(bits=o.bits, group_size=o.group_size, sym=self.sym(o))
        seed_everything(o.seed)
        model = GPTQModel.load(str(ctx.model.path), cfg, device=ctx.device)
        backend = BACKEND.AWQ_TORCH if ctx.device == "cpu" else BACKEND.AUTO
        with gptqmodel_logs_elsewhere():
            model.quantize(calibration_rows(ctx), batch_size=1, backend=backend)
        model.save(str(ctx.out))
