"""GPTQ (and AWQ, in awq.py) through GPTQModel, the maintained successor of AutoGPTQ.

Output: a ``checkpoint_format: gptq`` checkpoint whose config.json carries the standard
``quantization_config`` (quant_method gptq, bits, group_size, desc_act, sym) that transformers
(through gptqmodel + optimum) and vLLM load.
"""

from __future__ import annotations

import os
import random

from .base import Method, QuantizeOptions, RunContext

__all__ = ["GPTQ"]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def prepare_gptqmodel_env() -> None:
    # GPTQModel's CPU worker pool asks for 2 workers even on small machines ("Virtual pool ...
    # requests 2 workers" on <= 2 cores); give it what it asks for.
    if (os.cpu_count() or 1) <= 2:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def calibration_rows(ctx: RunContext) -> list[dict]:
    assert ctx.samples is not None
    return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in ctx.samples.input_ids]


class GPTQ(Method):
    name = "gptq"
    description = "GPTQ weight-only int4/int8 with group scales (GPTQModel); transformers + vLLM load it"
    bits = (4, 8)
    default_sym = True
    distribution = "gptqmodel"
    modules = ("gptqmodel", "optimum")
    extra = "gptq"

    def expected_config(self, options: QuantizeOptions) -> dict:
        return {"quant_method": "gptq", "bits": options.bits, "group_size": options.group_size,
                "desc_act": options.desc_act, "sym": self.sym(options), "checkpoint_format": "gptq"}

    def run(self, ctx: RunContext) -> None:
        prepare_gptqmodel_env()
        from gptqmodel import GPTQConfig, GPTQModel

        o = ctx.options
        cfg = GPTQConfig(bits=o.bits, group_size=o.group_size, desc_act=o.desc_act, sym=self.sym(o))
        seed_everything(o.seed)
        model = GPTQModel.load(str(ctx.model.path), cfg, device=ctx.device)
        model.quantize(calibration_rows(ctx), batch_size=1)
        model.save(str(ctx.out))
