"""GGUF export: ``qtk quantize MODEL --method gguf --gguf-type Q4_K_M [--gguf-type IQ4_XS ...]``.

One conversion, one importance matrix, several files:

1. llama.cpp's converter (vendored, :mod:`qtk.quantize.gguf_convert`) writes a BF16 GGUF of the checkpoint;
2. the importance matrix (:mod:`qtk.quantize.imatrix`) is collected on the HF model over the calibration
   samples (``--calibration``/``--samples``/``--seq-len``, as GPTQ/AWQ read them) and written beside the
   files (``<model>.imatrix``, llama-imatrix's GGUF format: ``llama-quantize --imatrix`` reads it);
3. every ``--gguf-type`` is quantized from the BF16 file by ``llama_model_quantize``
   (:mod:`qtk.quantize.gguf_quantize`) with the matrix, except ``--no-imatrix`` (K-quants only: the
   I-quants are refused without one) and the types that ignore it (BF16, F16, Q8_0).

The intermediate BF16 file is removed unless BF16 is one of the types. The output folder holds the
``.gguf`` files, the ``.imatrix``, an Ollama ``Modelfile``, the model card and qtk_provenance.json; the
pipeline (:mod:`qtk.quantize.run`) writes it to a temporary directory and puts it in place when whole.
"""

from __future__ import annotations

import gc
import os
import resource
import shutil
import time
from pathlib import Path

from .. import errors
from .._digest import file_sha256 as _sha256
from .base import Method, QuantizeOptions, RunContext
from ..gguf_types import FILE_TYPES, IMATRIX_UNUSED, FileType, file_type
from .source import SourceModel

__all__ = ["GGUF"]

_MB = 1e6


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def base_name(model: SourceModel) -> str:
    """The files' stem: the repo's name (``SmolLM2-135M-Instruct``), else the directory's."""
    return (model.repo_id or "").split("/")[-1] or model.path.name


def compute_dtype(device: str):
    """The dtype the importance matrix is collected in: BF16 on a GPU and on CPUs with AVX512-BF16/AMX
    (2.7x faster than FP32 for SmolLM2 on this project's CPU), FP32 on other CPUs (BF16 matmuls are
    emulated there and several times slower)."""
    import torch

    if device == "cuda":
        return torch.bfloat16
    fast_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if fast_bf16 else torch.float32


class GGUF(Method):
    name = "gguf"
    description = ("GGUF for llama.cpp / Ollama / LM Studio: llama.cpp's converter, K- and I-quants through "
                   "llama_model_quantize, importance matrix from the calibration set")
    bits = (4,)  # nominal: each --gguf-type sets its own bits
    needs_calibration = True  # the importance matrix (calibrates() says when a run reads it)
    uses_group_size = False
    default_sym = True
    distribution = "llama-cpp-python"
    modules = ("llama_cpp", "torch", "transformers", "numpy", "yaml", "tqdm")
    extra = "gguf-export"
    reports_progress = True
    writes_checkpoint = False

    # -- what a run makes --------------------------------------------------------------------------
    @staticmethod
    def types(options: QuantizeOptions) -> list[FileType]:
        return [file_type(t) for t in options.gguf_type if t in FILE_TYPES]

    def calibrates(self, options: QuantizeOptions) -> bool:
        return options.imatrix and any(t.name not in IMATRIX_UNUSED for t in self.types(options))

    def expected_config(self, options: QuantizeOptions) -> dict:
        return {"quant_method": "gguf", "gguf_types": list(options.gguf_type), "imatrix": self.calibrates(options)}

    def label(self, options: QuantizeOptions) -> str:
        return f"{', '.join(options.gguf_type)} (importance matrix {'on' if self.calibrates(options) else 'off'})"

    # -- refusals ----------------------------------------------------------------------------------
    def option_problems(self, options: QuantizeOptions) -> dict[str, str]:
        out = super().option_problems(options)
        if "bits" in out:
            out["bits"] = "gguf takes its bits from --gguf-type (Q8_0, Q4_K_M, IQ4_XS...), not --bits"
        if not self.calibrates(options):  # no calibration read: its sizes do not matter
            out.pop("samples", None)
            out.pop("seq_len", None)
        unknown = [t for t in options.gguf_type if t not in FILE_TYPES]
        if not options.gguf_type:
            out["gguf_type"] = f"gguf needs at least one type, e.g. Q4_K_M (types: {', '.join(FILE_TYPES)})"
        elif unknown:
            out["gguf_type"] = f"unknown GGUF type {', '.join(unknown)} (types: {', '.join(FILE_TYPES)})"
        need = [t.name for t in self.types(options) if t.needs_imatrix]
        if need and not options.imatrix:
            out["imatrix"] = (f"{', '.join(need)} {'is' if len(need) == 1 else 'are'} refused without an importance "
                              "matrix (--no-imatrix): llama.cpp's I-quants choose their grid by importance-weighted "
                              "error and come out badly without one")
        return out

    def validate(self, model: SourceModel, options: QuantizeOptions, device: str) -> None:
        problems = self.option_problems(options)
        if "imatrix" in problems:
            raise errors.UnsupportedConfigError(
                problems["imatrix"] + ".", hint="Drop --no-imatrix (the calibration set makes one), or choose "
                "K-quants (Q4_K_M, Q5_K_M, Q6_K...) to compare without one.")
        if "gguf_type" in problems:
            raise errors.UnsupportedConfigError(problems["gguf_type"] + ".", hint="Repeat --gguf-type for several "
                                                "files from one conversion, e.g. --gguf-type Q4_K_M --gguf-type Q8_0.")
        super().validate(model, options, device)
        from .gguf_convert import converter_info, supported_architectures

        commit = converter_info()["llama_cpp_commit"]
        if model.architecture not in supported_architectures():
            raise errors.UnsupportedConfigError(
                f"llama.cpp's converter (commit {commit}, carried by qtk) does not convert {model.architecture}.",
                hint="Check that llama.cpp supports this architecture; a newer qtk may carry a newer converter.")
        cfg = model.config.get("text_config") or model.config
        if self.calibrates(options) and any(cfg.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise errors.UnsupportedConfigError(
                "qtk does not collect the importance matrix of mixture-of-experts layers (per-expert counts).",
                hint="Use --no-imatrix with K-quants (Q4_K_M, Q5_K_M, Q6_K, Q8_0) for this model.")

    # -- the run -----------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> dict:
        progress = ctx.progress or (lambda stage, done, total, peak=None: None)
        types, base, out = self.types(ctx.options), base_name(ctx.model), ctx.out
        bf16_bytes = ctx.model.num_params * 2
        _check_disk(out, bf16_bytes, types, ctx.model)
        from .gguf_convert import convert_to_gguf, converter_info

        bf16 = out / f".{base}-BF16.gguf.partial"
        conv = convert_to_gguf(ctx.model.path, bf16, expected_bytes=bf16_bytes,
                               progress=lambda d, t: progress("gguf: converting (MB)", int(d / _MB), int(t / _MB), None))
        details: dict = {"converter": {**{k: v for k, v in converter_info().items() if k != "what"},
                                       "seconds": round(conv.seconds, 2), "cpu_seconds": round(conv.cpu_seconds, 2)}}
        means = None
        if self.calibrates(ctx.options):
            im_details, means = self._imatrix(ctx, conv.tensor_map, out / f"{base}.imatrix", progress)
            details["imatrix"] = im_details
            _check_coverage(bf16, means, types)
        files, src = {}, bf16
        for i, ft in enumerate(types):
            progress("gguf: types done", i, len(types), None)
            dst = out / f"{base}-{ft.name}.gguf"
            files[ft.name] = self._one_type(ft, src, dst, means, details.get("imatrix"))
            src = dst if ft.name == "BF16" else src  # the conversion became the BF16 file: later types read it
        progress("gguf: types done", len(types), len(types), None)
        bf16.unlink(missing_ok=True)
        (out / "Modelfile").write_text(modelfile(base, [t.name for t in types]))
        details["files"] = files
        return details

    def _imatrix(self, ctx: RunContext, tensor_map: dict[str, list[str]], path: Path, progress):
        from ..hfload import load_causal_lm
        from .imatrix import collect_imatrix

        t0, c0 = time.monotonic(), _cpu_s()
        dtype = compute_dtype(ctx.device)
        model, _ = load_causal_lm(ctx.model.path, dtype=dtype, device=ctx.device)
        targets = _matmul_targets(model, tensor_map)
        if not targets:
            raise errors.QuantizeError("No decoder matmul of the model matches a tensor the converter wrote.",
                                       hint="Use --no-imatrix with K-quants; please report the architecture.")
        samples = ctx.samples.input_ids
        im = collect_imatrix(model, samples, targets,
                             progress=lambda d, t: progress("gguf: importance matrix batches", d, t, None))
        del model
        gc.collect()
        im.datasets = [ctx.samples.calibration.name]
        digest = im.write(path)
        return {"file": path.name, "sha256": digest, "entries": len(im.sums), "chunk_count": im.chunk_count,
                "chunk_size": im.chunk_size, "tokens": im.chunk_count * im.chunk_size, "datasets": im.datasets,
                "calibration_sha256": ctx.samples.calibration.sha256, "compute_dtype": str(dtype).replace("torch.", ""),
                "seconds": round(time.monotonic() - t0, 2), "cpu_seconds": round(_cpu_s() - c0, 2)}, im.means()

    @staticmethod
    def _one_type(ft: FileType, src: Path, dst: Path, means, im: dict | None) -> dict:
        from .gguf_quantize import quantize_gguf

        t0, c0 = time.monotonic(), _cpu_s()
        use = means is not None and ft.name not in IMATRIX_UNUSED
        if ft.name == "BF16":  # the conversion is the BF16 file: kept (renamed), not copied
            os.replace(src, dst)
        else:
            meta = {"quantize.imatrix.file": im["file"], "quantize.imatrix.dataset": im["datasets"][0],
                    "quantize.imatrix.entries_count": im["entries"], "quantize.imatrix.chunks_count": im["chunk_count"]
                    } if use and im else None
            quantize_gguf(src, dst, ft, imatrix=means if use else None, metadata=meta)
        with open(dst, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise errors.QuantizeError(f"{dst.name} is not a GGUF file after quantization.")
        return {"file": dst.name, "bytes": dst.stat().st_size, "sha256": _sha256(dst), "imatrix": use,
                "seconds": round(time.monotonic() - t0, 2), "cpu_seconds": round(_cpu_s() - c0, 2)}

    def model_card(self, model: SourceModel, provenance: dict) -> str:
        from .gguf_card import model_card

        return model_card(model, provenance)


def _matmul_targets(model, tensor_map: dict[str, list[str]]) -> dict[str, list[str]]:
    """HF module name -> the GGUF ``blk.*`` tensors its weight became, for the decoder blocks' matmuls
    (``nn.Linear``). No reference to a module outlives the call: the model is freed before quantizing."""
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    targets = {name[: -len(".weight")]: [g for g in gguf if g.startswith("blk.")]
               for name, gguf in tensor_map.items() if name.endswith(".weight")}
    return {m: g for m, g in targets.items() if g and kinds.get(m) == "Linear"}


def modelfile(base: str, types: list[str]) -> str:
    """An Ollama Modelfile for the first type made (the chat template comes from the GGUF's metadata)."""
    first = next((t for t in types if t != "BF16"), types[0])
    others = [t for t in types if t != first]
    lines = [f"# ollama create {base.lower()}-{first.lower()} -f Modelfile && ollama run {base.lower()}-{first.lower()}",
             f"FROM ./{base}-{first}.gguf"]
    if others:
        lines.insert(1, "# other files here: " + ", ".join(f"{base}-{t}.gguf" for t in others) + " (change FROM)")
    return "\n".join(lines) + "\n"


def _check_disk(out: Path, bf16_bytes: int, types: list[FileType], model: SourceModel) -> None:
    """The BF16 conversion plus every file, before the conversion starts (planner's sizes, +10%)."""
    from ..plan import gguf_weight_bytes, shape_from_config

    try:
        shape = shape_from_config(model.config)
        need = bf16_bytes + sum(gguf_weight_bytes(shape, t.name) for t in types if t.name != "BF16")
    except errors.ModelFormatError:
        need = bf16_bytes * (1 + len(types))
    free = shutil.disk_usage(out).free
    if need * 1.1 > free:
        raise errors.DiskSpaceError(
            f"The GGUF files need about {need * 1.1 / 1e9:.2f} GB in {out.parent} (the BF16 conversion and "
            f"{len(types)} file(s)); {free / 1e9:.2f} GB are free.", hint="Free space, choose another -o, or make fewer types per run.")


def _check_coverage(bf16: Path, means: dict, types: list[FileType]) -> None:
    """Every block matmul a type quantizes must have its importance-matrix row before llama.cpp starts
    (an I-quant stops midway without one): compare with the converted file's tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(bf16)
    wanted = [t.name for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith(".weight")
              and len(t.shape) >= 2 and "_norm" not in t.name and "ffn_gate_inp" not in t.name]
    missing = [n for n in wanted if n not in means]
    need = [t.name for t in types if t.needs_imatrix]
    if missing and need:
        raise errors.QuantizeError(
            f"The importance matrix covers {len(wanted) - len(missing)} of {len(wanted)} block matmuls "
            f"(missing {', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}); {', '.join(need)} cannot be made.",
            hint="Choose K-quants for this architecture (they quantize the missing tensors without one).")
