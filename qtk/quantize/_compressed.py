"""FP8 and INT8 W8A8 checkpoints in the compressed-tensors format that vLLM loads (the shared part of
:mod:`qtk.quantize.fp8` and :mod:`qtk.quantize.w8a8`).

The pipeline, with the ``compressed-tensors`` package alone (llm-compressor does not install beside
qtk's transformers pin):

1. load the checkpoint with transformers (the whole model, on the device, in its half type; FP32 on a
   CPU without AVX512-BF16/AMX while a method runs calibration passes through it: BF16 is emulated there);
2. a method's own preparation (W8A8: SmoothQuant smoothing, :mod:`qtk.quantize.w8a8`);
3. cast to the dtype saved (the source's BF16/FP16; an FP32 source is saved as BF16);
4. attach the preset scheme to every ``nn.Linear`` but ``lm_head`` (``apply_quantization_config``):
   weights symmetric per output channel, input activations dynamic per token (no scales stored);
5. per-channel weight scales from each row's absolute maximum (``calculate_qparams``), computed in
   FP32 and stored in the saved dtype, as llm-compressor's min-max observer does;
6. compress in memory (``ModelCompressor``: ``float8_e4m3fn`` / ``int8`` weights + ``weight_scale``
   ``[out, 1]``), ``save_pretrained``, then ``update_config`` writes ``quantization_config``
   (``quant_method: compressed-tensors``, ``format``, ``config_groups``, ``ignore: ["lm_head"]``);
7. the written ``config_groups`` are checked against what the method promises (a compressed-tensors
   release that serialized another scheme would be caught here, not in vLLM).

compressed-tensors 0.20 needs Python >= 3.11: on 3.10 the methods stay listed and refuse with the
reason (:meth:`CompressedMethod.check_available`).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from .. import errors
from .base import Method, QuantizeOptions, RunContext

__all__ = ["CompressedMethod", "MIN_PYTHON", "IGNORE", "scheme_fields"]

MIN_PYTHON = (3, 11)  # compressed-tensors 0.20 (Requires-Python >= 3.11)
IGNORE = ["lm_head"]  # kept in 16-bit: vLLM's compressed-tensors checkpoints leave the head unquantized
_SCHEME_KEYS = ("type", "num_bits", "strategy", "symmetric", "dynamic")


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def scheme_fields(weight_type: str) -> dict:
    """The fields of ``config_groups.group_0`` a method promises (``weight_type``: "float" or "int"):
    8-bit symmetric weights per output channel, 8-bit symmetric input activations per token, dynamic."""
    return {
        "targets": ["Linear"],
        "weights": {"type": weight_type, "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"type": weight_type, "num_bits": 8, "strategy": "token", "symmetric": True,
                              "dynamic": True},
    }


class CompressedMethod(Method):
    """A compressed-tensors preset: the subclass names it (``preset``) and its ``format``."""

    preset: str  # compressed-tensors' preset scheme name (FP8_DYNAMIC, W8A8)
    format: str  # the checkpoint's format: float-quantized or int-quantized
    weight_type: str  # "float" or "int" (the scheme's type, weights and activations)
    bits = (8,)
    uses_group_size = False  # one scale per output channel
    default_sym = True
    distribution = "compressed-tensors"
    modules = ("compressed_tensors", "transformers", "accelerate")
    extra = "compressed"

    # -- availability: Python >= 3.11 first (a 3.10 install has no compressed-tensors to find)
    def python_problem(self) -> str | None:
        if sys.version_info[:2] < MIN_PYTHON:
            return f"compressed-tensors needs Python >= {_dotted(MIN_PYTHON)}; this is Python {platform.python_version()}"
        return None

    def unavailable_reason(self) -> str | None:
        return self.python_problem() or super().unavailable_reason()

    def check_available(self) -> None:
        too_old = self.python_problem()
        if too_old:
            raise errors.BackendUnavailableError(
                f"Method {self.name!r} writes the compressed-tensors format: {too_old}.",
                hint=f"Run qtk on Python {_dotted(MIN_PYTHON)} or newer for fp8/w8a8 (pip install 'qtk[quantize]' "
                     "there brings compressed-tensors); gptq, awq and nf4 work on this Python.")
        super().check_available()

    # -- what the output must carry
    def expected_config(self, options: QuantizeOptions) -> dict:
        return {"quant_method": "compressed-tensors", "format": self.format, "ignore": IGNORE}

    def validate(self, model, options: QuantizeOptions, device: str) -> None:
        super().validate(model, options, device)
        cfg = model.config
        experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
        if experts:
            raise errors.UnsupportedConfigError(
                f"{self.name} handles dense decoders; {model.path.name} is a mixture of experts ({experts} experts).",
                hint="A MoE's router gates must stay unquantized for vLLM, which qtk's ignore list does not cover yet.")

    def prepare(self, model, ctx: RunContext) -> dict:
        """A method's work on the loaded model before the weights are quantized (W8A8: smoothing).
        Returns details for provenance."""
        return {}

    def load_dtype(self, ctx: RunContext):
        """The dtype the model is loaded in: the saved one, except on a CPU without fast BF16 matmuls
        (AVX512-BF16/AMX) when calibration passes run through it: FP32 there (BF16 is emulated, ~7x slower;
        with AMX, BF16 took 0.6x FP32's CPU time for SmolLM2's calibration forwards)."""
        import torch

        from .gguf import compute_dtype  # the one owner of "which dtype computes fast here"

        if self.calibrates(ctx.options) and compute_dtype(ctx.device) == torch.float32:
            return torch.float32
        return saved_dtype(ctx)

    def run(self, ctx: RunContext) -> dict:
        import torch
        from compressed_tensors.compressors import ModelCompressor
        from transformers import AutoModelForCausalLM

        load_dtype = self.load_dtype(ctx)
        model = AutoModelForCausalLM.from_pretrained(
            ctx.model.path, dtype=load_dtype, device_map={"": 0} if ctx.device == "cuda" else "cpu").eval()
        details = {"scheme": self.preset, "ignore": IGNORE, "compute_dtype": str(load_dtype).removeprefix("torch.")}
        with torch.no_grad():
            details.update(self.prepare(model, ctx))
            dtype = saved_dtype(ctx)
            if model.dtype != dtype:
                model.to(dtype)
            model.config.dtype = dtype
            details["quantized_linears"] = attach_scheme_and_scales(model, self.preset)
            compressor = ModelCompressor.from_pretrained_model(model)
            compressor.compress_model(model)
        model.save_pretrained(ctx.out)
        compressor.update_config(str(ctx.out))
        check_written_scheme(ctx.out, self)
        return details


def saved_dtype(ctx: RunContext):
    """The source's half type (BF16 or FP16); an FP32 source is saved as BF16."""
    import torch

    return torch.float16 if ctx.model.dtype == "float16" else torch.bfloat16


def attach_scheme_and_scales(model, preset: str) -> int:
    """Attach ``preset`` to every ``nn.Linear`` but :data:`IGNORE` and set each one's per-channel weight
    scale from its rows' absolute maxima. Returns how many linears it quantized."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=list(IGNORE), quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config, show_progress=False)
    n = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not hasattr(module, "weight_scale"):
            continue
        w = module.weight.detach().float()
        scale, zero = calculate_qparams(w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True), scheme.weights)
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):  # symmetric: zero, and dropped when compressed
            module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))
        module.quantization_status = QuantizationStatus.FROZEN
        n += 1
    if not n:
        raise errors.QuantizeError("No linear layer was quantized: the model has no nn.Linear outside lm_head.")
    return n


def check_written_scheme(out: Path, method: CompressedMethod) -> None:
    """The saved ``config_groups`` hold exactly one group with the scheme the method promises."""
    qc = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
    groups = qc.get("config_groups") or {}
    want = scheme_fields(method.weight_type)
    problems = []
    if len(groups) != 1:
        problems.append(f"{len(groups)} config groups (expected 1)")
    for group in groups.values():
        if group.get("targets") != want["targets"]:
            problems.append(f"targets {group.get('targets')}")
        for part in ("weights", "input_activations"):
            got = {k: (group.get(part) or {}).get(k) for k in _SCHEME_KEYS}
            if got != want[part]:
                problems.append(f"{part} {got}")
    if problems:
        raise errors.QuantizeError(
            f"compressed-tensors wrote another scheme than {method.preset}: " + "; ".join(problems) + ".",
            hint="vLLM would load a different format; please report it with the compressed-tensors version.")
