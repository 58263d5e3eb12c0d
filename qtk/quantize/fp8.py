"""FP8 for vLLM: ``float8_e4m3fn`` weights with one scale per output channel, input activations
quantized to FP8 dynamically per token at run time (compressed-tensors' FP8_DYNAMIC scheme). Data-free:
no calibration. vLLM runs it with FP8 matmuls on GPUs that have them (Ada, Hopper, Blackwell) and as
weight-only FP8 (Marlin) on older ones. See :mod:`qtk.quantize._compressed` for the pipeline.
"""

from __future__ import annotations

from ._compressed import CompressedMethod

__all__ = ["FP8"]


class FP8(CompressedMethod):
    name = "fp8"
    description = ("FP8 E4M3 weights with per-channel scales, dynamic per-token FP8 activations "
                   "(compressed-tensors FP8_DYNAMIC), data-free; vLLM and transformers load it")
    needs_calibration = False
    preset = "FP8_DYNAMIC"
    format = "float-quantized"
    weight_type = "float"
