"""NF4 through bitsandbytes: 4-bit NormalFloat, double quantization, bf16 compute, saved as a
serialized 4-bit checkpoint that ``from_pretrained`` reloads. Data-free: no calibration.

Pitfall handled here: on CPUs with AVX512-BF16, bitsandbytes repacks the 4-bit weights in place on
the first forward pass, and a ``save_pretrained`` after that writes the repacked layout, which
reloads silently wrong. So the model is saved straight after loading, before any forward pass.
"""

from __future__ import annotations

from .base import Method, QuantizeOptions, RunContext

__all__ = ["NF4"]


class NF4(Method):
    name = "nf4"
    description = "bitsandbytes NF4 (double quant, bf16 compute), data-free; transformers + vLLM load it"
    bits = (4,)
    needs_calibration = False
    uses_group_size = False  # fixed 64-element blocks
    default_sym = True
    distribution = "bitsandbytes"
    modules = ("bitsandbytes", "accelerate")
    extra = "nf4"

    def expected_config(self, options: QuantizeOptions) -> dict:
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}

    def run(self, ctx: RunContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            ctx.model.path, quantization_config=config, dtype=torch.bfloat16,
            device_map={"": 0} if ctx.device == "cuda" else "cpu",
        )
        model.save_pretrained(ctx.out)  # before any forward pass (see the module docstring)
