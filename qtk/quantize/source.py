"""The model to quantize: resolve it (:mod:`qtk.modelspec`: a local dir, or a repo id from the cache /
pulled with qtk),
and check it before any heavy work, from config.json and the safetensors headers only."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .. import errors
from .._digest import file_sha256  # re-exported: the weights' digests in provenance and resume identities
from ..hfload import read_config
from ..modelspec import resolve_spec
from ..settings import Settings

__all__ = ["SourceModel", "resolve_model", "safetensors_header", "check_group_size", "group_size_problem", "file_sha256"]

_FLOAT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_NOT_QUANTIZED = ("embed", "lm_head", "norm", "rotary")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, offsets)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise errors.ModelFormatError(f"{path} is not a safetensors file (too short).")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise errors.ModelFormatError(f"{path} is not a safetensors file (header length {n}).")
        try:
            return json.loads(fh.read(n))
        except ValueError as exc:
            raise errors.ModelFormatError(f"{path} has a corrupt safetensors header: {exc}") from exc


@dataclass(frozen=True)
class SourceModel:
    path: Path
    repo_id: str | None
    commit: str | None
    config: dict
    weight_files: tuple[Path, ...]
    tensors: dict  # name -> {"dtype", "shape"}

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "?")

    @property
    def dtype(self) -> str:
        return self.config.get("torch_dtype") or self.config.get("dtype") or "?"

    @property
    def num_params(self) -> int:
        return sum(math.prod(t["shape"]) for t in self.tensors.values())

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    def quantizable_linears(self) -> dict[str, tuple[int, int]]:
        """Decoder-layer 2D weights (what GPTQ/AWQ/NF4 quantize): name -> (out, in)."""
        out = {}
        for name, t in self.tensors.items():
            if (
                name.endswith(".weight")
                and len(t["shape"]) == 2
                and ".layers." in name
                and not any(k in name for k in _NOT_QUANTIZED)
            ):
                out[name[: -len(".weight")]] = (t["shape"][0], t["shape"][1])
        return out

    def to_dict(self) -> dict:
        return {"path": str(self.path), "repo_id": self.repo_id, "commit": self.commit,
                "architecture": self.architecture, "model_type": self.model_type, "dtype": self.dtype,
                "num_params": self.num_params, "weight_bytes": self.weight_bytes}


def resolve_model(spec: str, *, revision: str | None = None, settings: Settings | None = None) -> SourceModel:
    """Find the checkpoint and validate it as a BF16/FP16/FP32 causal LM that is not quantized yet."""
    path, repo_id, commit = resolve_spec(spec, revision=revision, settings=settings or Settings.from_env())
    if not path.is_dir():
        raise errors.ModelFormatError(f"{path} is a file; qtk quantize takes a checkpoint directory.",
                                      hint="Give the directory holding config.json and the .safetensors weights.")
    config = read_config(path, missing=f"{path} has no config.json: not a Hugging Face checkpoint.")
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise errors.ModelFormatError(
            f"{path} is not a causal language model (architectures: {archs or 'none'}).",
            hint="qtk quantize handles *ForCausalLM checkpoints.",
        )
    qc = config.get("quantization_config")
    if qc:
        raise errors.ModelFormatError(
            f"{path} is already quantized (quant_method: {qc.get('quant_method', '?')}).",
            hint="Quantize the original BF16/FP16 checkpoint instead.",
        )
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in _FLOAT_DTYPES:
        raise errors.ModelFormatError(f"{path} has dtype {dtype!r}; qtk quantizes bfloat16, float16 or float32 weights.")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin"))
        raise errors.ModelFormatError(
            f"{path} has no .safetensors weights{' (found ' + ', '.join(other) + ')' if other else ''}.",
            hint="Convert the checkpoint to safetensors (transformers save_pretrained does by default).",
        )
    tensors: dict = {}
    for f in files:
        for name, meta in safetensors_header(f).items():
            if name != "__metadata__":
                tensors[name] = {"dtype": meta["dtype"], "shape": meta["shape"]}
    bad = sorted({t["dtype"] for t in tensors.values()} - set(_FLOAT_DTYPES.values()))
    if bad:
        raise errors.ModelFormatError(f"{path} holds tensors of dtype {', '.join(bad)}: not a float checkpoint.")
    return SourceModel(path, repo_id, commit, config, tuple(files), tensors)


def group_size_problem(group_size: int) -> str | None:
    """The rule that does not depend on the model (read by the manifest at load, and by the check below):
    a power of two, or -1 (one group per row); 0 is GPTQModel's "no groups"."""
    if group_size in (-1, 0):
        return None
    if group_size < 0 or group_size & (group_size - 1):
        return f"must be a power of two or -1 (got {group_size})"
    return None


def check_group_size(model: SourceModel, group_size: int) -> None:
    """Every quantized layer's input width must be a multiple of the group size; otherwise the
    checkpoint saves fine and only fails at reload ("K to be divisible by qGroupSize")."""
    if why := group_size_problem(group_size):
        raise errors.UnsupportedConfigError(f"--group-size {why}.")
    if group_size in (-1, 0):
        return
    linears = model.quantizable_linears()
    for name, (_, k) in sorted(linears.items()):
        if k % group_size:
            widths = sorted({k for _, k in linears.values()})
            ok = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
            raise errors.UnsupportedConfigError(
                f"--group-size {group_size} does not divide the input width {k} of layer {name}.",
                hint=f"Input widths here: {widths}. Group sizes that fit every layer: {ok or 'none of 32-256'} "
                "(or -1: one group per row).",
            )
