"""Load a (possibly quantized) causal LM with transformers, on the device asked for.

One thing transformers + GPTQModel get wrong today, measured on an H100 (GPTQModel 7.6, transformers
5.23): for a GPTQ checkpoint, the kernel is auto-selected once for the whole model (Machete on Hopper)
and a layer whose shape that kernel cannot take (SmolLM2's 192-wide k/v projections, or 576-wide
inputs) then fails the load with ``NotImplementedError: ... must be divisible by [128]``. qtk retries
with the general-purpose kernels that take any shape divisible by 32 (Triton, then torch), and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import errors

__all__ = ["load_causal_lm", "read_config", "FALLBACK_KERNELS"]

log = logging.getLogger(__name__)

# quant_method -> kernels to try, in order, after the automatic choice failed
FALLBACK_KERNELS = {"gptq": ("gptq_triton", "gptq_torch"), "awq": ("gemm_triton", "torch_awq")}


def read_config(path: str | Path, *, missing: str) -> dict:
    """A config.json (the file, or a checkpoint dir's), or a ModelFormatError (``missing`` says why
    when there is none)."""
    cfg_path = Path(path) if Path(path).is_file() else Path(path) / "config.json"
    if not cfg_path.is_file():
        raise errors.ModelFormatError(missing)
    try:
        return json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise errors.ModelFormatError(f"{cfg_path} is not valid JSON: {exc}") from exc


def _quant_config(path: Path) -> dict:
    try:
        return read_config(path, missing="no config.json").get("quantization_config") or {}
    except errors.ModelFormatError:
        return {}


def _override(method: str, qc: dict, backend: str):
    from transformers import AwqConfig, GPTQConfig

    cls = GPTQConfig if method == "gptq" else AwqConfig
    return cls(bits=qc.get("bits", 4), group_size=qc.get("group_size", 128), backend=backend)


def load_causal_lm(path: str | Path, *, dtype, device: str):
    """Return ``(model, kernel)``: ``kernel`` is None when transformers' own choice loaded it, else the
    fallback kernel that did."""
    from transformers import AutoModelForCausalLM

    device_map = {"": 0} if device == "cuda" else "cpu"
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map).eval(), None
    except NotImplementedError as first:
        qc = _quant_config(Path(path))
        method = str(qc.get("quant_method", "")).lower()
        if device != "cuda" or method not in FALLBACK_KERNELS:
            raise
        tried = [f"auto: {first}"]
        for kernel in FALLBACK_KERNELS[method]:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, device_map=device_map, quantization_config=_override(method, qc, kernel))
            except (NotImplementedError, ValueError) as exc:
                tried.append(f"{kernel}: {exc}")
                continue
            log.warning("The automatically chosen %s kernel cannot take this model's layer shapes (%s); "
                        "loaded with %s instead.", method.upper(), first, kernel)
            return model.eval(), kernel
        raise errors.ModelFormatError(
            f"No {method.upper()} kernel could load {path} on the GPU: " + "; ".join(tried),
            hint="Try --device cpu, or a GPTQModel version with a kernel for these layer shapes.",
        ) from first
