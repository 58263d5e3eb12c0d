"""The one method registry (below everything that reads it: plan, quantize, provision, verify): every fact about a quantization method that another part of qtk needs.

Each entry names the method's CLI name, the module and class that implement it, the format of its
output (as ``qtk verify`` detects it), the ``qtk quantize`` options its output depends on (what
``qtk provision`` hashes into its keys), its memory model (which of :func:`qtk.plan.quantize_memory`'s
formulas applies, and which weight format :func:`qtk.plan.quantized_format` sizes), and a CPU time
figure for the big-model warning. The CLI's ``--method`` choices, the planner, provision's manifest
validation and keys, and verify's memory check all read it, so adding a method is one module (a
:class:`~qtk.quantize.base.Method` subclass) plus one :func:`register` call or table line.

Importing this module is cheap (no torch, no backend): the implementation is imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from . import errors

__all__ = ["MethodSpec", "register", "unregister", "method_spec", "method_names", "methods", "get_method",
           "list_methods", "CALIBRATION_OPTIONS"]

# the options every calibrated method reads (the calibration set and how it is sampled)
CALIBRATION_OPTIONS = ("calibration", "text_field", "samples", "seq_len", "seed", "chat_template", "allow_fewer")


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the CLI name (--method, manifests' `method`)
    implementation: str  # "package.module:Class", a Method subclass
    output_format: str  # the format qtk verify detects in the output (verify.models.detect_format)
    reads: tuple[str, ...]  # QuantizeOptions fields the output depends on (provision's keys); "method" implied
    memory_model: str  # "layerwise", "quantized_load" or "whole_model": the branch of qtk.plan.quantize_memory
    # "group" (4-bit + group scales/zeros, sized from --group-size) or the name of a qtk.plan.FORMATS entry
    # ("nf4", "fp8-dynamic", "int8-w8a8"): the format qtk.plan.quantized_format sizes
    weights: str
    summary: str  # one line for --help
    cpu_seconds_per_mparam: float = 1.0  # measured on SmolLM2-135M (2 cores), for the big-model warning

    def __post_init__(self) -> None:
        if self.memory_model not in ("layerwise", "quantized_load", "whole_model"):
            raise ValueError(f"{self.name}: memory_model must be 'layerwise', 'quantized_load' or 'whole_model'")
        # ``weights`` names a qtk.plan.FORMATS entry: the planner (a layer above this table) checks it when it
        # sizes the method (qtk.plan.quantized_format), and tests/test_registry.py checks every registered one

    def load(self):
        """The :class:`~qtk.quantize.base.Method` instance (imports the module)."""
        module, _, cls = self.implementation.partition(":")
        return getattr(importlib.import_module(module), cls)()


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"method {spec.name!r} is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


# -- the built-in methods ------------------------------------------------------------------------------
# On CPU, measured on SmolLM2-135M (2 cores, 64 x 256 tokens): GPTQ ~150 s, NF4 seconds; AWQ with qtk's clip and
# scale searches ~1.9-2.0x GPTQ (BENCHMARKS.md: 170 vs 83-92 CPU s at 16 x 256; the stock path 951 CPU s).
register(MethodSpec(
    "gptq", "qtk.quantize.gptq:GPTQ", "gptq",
    reads=("bits", "group_size", "sym", "desc_act", *CALIBRATION_OPTIONS),
    memory_model="layerwise", weights="group", cpu_seconds_per_mparam=1.1,
    summary="GPTQModel, calibrated; 4/8-bit, group scales"))
register(MethodSpec(
    "awq", "qtk.quantize.awq:AWQ", "awq",
    reads=("bits", "group_size", "sym", *CALIBRATION_OPTIONS),
    memory_model="layerwise", weights="group", cpu_seconds_per_mparam=2.2,
    summary="GPTQModel's AWQ, calibrated; zero-point GEMM format"))
register(MethodSpec(
    "nf4", "qtk.quantize.nf4:NF4", "nf4",
    reads=("bits",),  # NF4 has no symmetric/asymmetric choice: sym is never read
    memory_model="quantized_load", weights="nf4", cpu_seconds_per_mparam=0.2,
    summary="bitsandbytes NF4, data-free"))
# compressed-tensors checkpoints for vLLM (Python >= 3.11). The whole model is loaded; on CPU, SmolLM2-135M:
# FP8 15 CPU s (0.1 per Mparam), W8A8 smoothed over 64 x 256 tokens 50 CPU s (0.4) (BENCHMARKS.md, "--method fp8 / w8a8").
register(MethodSpec(
    "fp8", "qtk.quantize.fp8:FP8", "fp8",
    reads=(),  # data-free and 8-bit only: no option changes its output
    memory_model="whole_model", weights="fp8-dynamic", cpu_seconds_per_mparam=0.1,
    summary="compressed-tensors FP8 for vLLM (E4M3 weights per channel, dynamic per-token activations), "
            "data-free; Python >= 3.11"))
register(MethodSpec(
    "w8a8", "qtk.quantize.w8a8:W8A8", "w8a8",
    reads=("smooth", "smooth_alpha", *CALIBRATION_OPTIONS),
    memory_model="whole_model", weights="int8-w8a8", cpu_seconds_per_mparam=0.4,
    summary="compressed-tensors INT8 W8A8 for vLLM (per-channel weights, dynamic per-token activations), "
            "SmoothQuant-smoothed from calibration (--no-smooth); Python >= 3.11"))
# GGUF files for llama.cpp / Ollama: llama.cpp's converter (vendored), an importance matrix collected over the whole
# model (BF16 on AMX/AVX512-BF16 CPUs and GPUs, else FP32), llama_model_quantize per type. weights: the BF16
# conversion, the largest file a GGUF build writes (every type is made from it). CPU time measured on SmolLM2-135M,
# conversion + 64 x 256-token imatrix + Q4_K_M: 73 CPU s against GPTQ g64's 133 in the same benchmark run, 58 after
# the imatrix hooks' rework (BENCHMARKS.md "GGUF export"); the importance matrix's forward passes are most of it.
register(MethodSpec(
    "gguf", "qtk.quantize.gguf:GGUF", "gguf",
    reads=("gguf_type", "imatrix", *CALIBRATION_OPTIONS),
    memory_model="whole_model", weights="gguf-bf16", cpu_seconds_per_mparam=0.5,
    summary="GGUF files for llama.cpp/Ollama (--gguf-type Q4_K_M, repeatable), importance matrix from the "
            "calibration set (--no-imatrix)"))


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def methods() -> tuple[MethodSpec, ...]:
    return tuple(_REGISTRY.values())


def method_spec(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise errors.UsageError(f"Unknown method {name!r}.", hint=f"Choose one of: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def get_method(name: str):
    """The implementation of ``name`` (a :class:`~qtk.quantize.base.Method`)."""
    return method_spec(name).load()


def list_methods() -> list:
    return [s.load() for s in _REGISTRY.values()]
