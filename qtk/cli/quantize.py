"""``qtk quantize`` and ``qtk calibration list``: thin wrappers over :mod:`qtk.quantize`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ._options import json_option, quiet_option
from ._output import get_output
from ._progress import backend_session

__all__ = ["quantize_cmd", "calibration"]


def _default_output(model: str, method: str, bits: int, group: int) -> Path:
    from ..methods import method_spec

    name = Path(model).name if Path(model).exists() else model.split("/")[-1]
    if method_spec(method).output_format == "gguf":  # several types per run: the folder holds them all
        return Path(f"{name}-gguf")
    suffix = f"w{bits}" + (f"g{group}" if method_spec(method).weights == "group" else "")
    return Path(f"{name}-{method}-{suffix}")


class MethodChoice(click.Choice):
    """``--method``'s choices, read from the method registry when asked (methods registered after
    import show up in ``--help`` and are accepted)."""

    def __init__(self) -> None:
        super().__init__((), case_sensitive=True)

    @property
    def choices(self):
        from ..methods import method_names

        return method_names()

    @choices.setter
    def choices(self, _value) -> None:  # click's __init__ assigns it; the registry is the source
        pass


class MethodHelpOption(click.Option):
    """``--method``'s help: one line per registered method, from the registry."""

    def get_help_record(self, ctx):
        from ..methods import methods

        self.help = "; ".join(f"{m.name}: {m.summary}" for m in methods()) + "."
        return super().get_help_record(ctx)


@click.command("quantize")
@click.argument("model")
@click.option("--method", type=MethodChoice(), required=True, cls=MethodHelpOption, help="(from the method registry)")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (default: ./<model>-<method>-w<bits>g<group>, g<group> for the methods "
                   "with group scales; ./<model>-gguf for gguf).")
@click.option("--bits", type=int, default=None,
              help="Weight bits [default: the method's first: 4; fp8 and w8a8 are 8 only; gptq also takes 8].")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Weights per scale group; must divide every layer's input width (checked first). -1: per row.")
@click.option("--sym/--asym", default=None, help="Symmetric or zero-point quantization "
              "[default: gptq sym, awq asym (the AutoAWQ GEMM format vLLM users know)].")
@click.option("--desc-act/--no-desc-act", default=False, show_default=True, help="GPTQ act-order.")
@click.option("--calibration", default="chat", show_default=True, metavar="NAME|FILE|hf://datasets/...",
              help="A named set (`qtk calibration list`), a .txt/.jsonl/.parquet file, or a Hub dataset.")
@click.option("--text-field", help="Field/column holding the text in .jsonl/.parquet calibration files.")
@click.option("--samples", type=int, default=128, show_default=True, help="Calibration samples.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per calibration sample.")
@click.option("--allow-fewer", is_flag=True, help="Use fewer samples when the set is too small instead of failing.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds sampling and the backend.")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Render chat calibration data through the model's chat template [default: on for chat sets "
                   "when the tokenizer has one: right for instruct models].")
@click.option("--smooth/--no-smooth", default=True, show_default=True,
              help="w8a8: SmoothQuant smoothing from the calibration set, folded into the norms before q/k/v and "
                   "gate/up (--no-smooth reads no calibration).")
@click.option("--smooth-alpha", type=float, default=0.5, show_default=True,
              help="w8a8: smoothing's migration strength, 0 (all on activations) to 1 (all on weights).")
@click.option("--gguf-type", "gguf_type", multiple=True, metavar="TYPE",
              help="gguf: a llama.cpp file type, repeatable (one conversion and one importance matrix for all): "
                   "BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_K_S, IQ4_XS, Q3_K_M, IQ2_XS and more (`qtk plan` sizes them).")
@click.option("--imatrix/--no-imatrix", default=True, show_default=True,
              help="gguf: quantize with an importance matrix from the calibration set (--no-imatrix: K-quants "
                   "only, to compare; I-quants are refused without one).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: CUDA when torch sees a GPU, else CPU (small models).")
@click.option("--revision", help="Revision when MODEL is a repo id (pulled with qtk's downloader if missing).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory (atomically).")
@click.option("-v", "--verbose", is_flag=True,
              help="Stream the backends' own output live (default: into a per-run log file, path printed).")
@json_option
@quiet_option
def quantize_cmd(model, method, output, bits, group_size, sym, desc_act, calibration, text_field, samples, seq_len,
                 allow_fewer, seed, chat_template, smooth, smooth_alpha, gguf_type, imatrix, device, revision, overwrite,
                 verbose) -> None:
    """Quantize a BF16/FP16 checkpoint to 4-bit GPTQ, AWQ or NF4, or to FP8 / INT8 W8A8 (compressed-tensors),
    that transformers and vLLM load.

    MODEL is a local checkpoint directory or a Hub repo id (taken from the HF cache, pulled with
    qtk's verified downloader when missing). Everything that can be refused is checked before heavy
    work: causal-LM checkpoint, not already quantized, float dtype, group size vs every layer, output
    dir, disk and memory. The output appears atomically when complete, with tokenizer files, chat
    template, generation config, a model card and qtk_provenance.json.

    \b
    Examples:
      qtk quantize meta-llama/Llama-3.1-8B-Instruct --method awq --calibration chat -o ./llama-awq
      qtk quantize ./smollm2-bf16 --method gptq --group-size 64 --desc-act --samples 64 --seq-len 256
      qtk quantize ./model --method nf4 -o ./model-nf4 --json
      qtk quantize ./model --method fp8 -o ./model-fp8              # vLLM FP8 (compressed-tensors)
      qtk quantize ./model --method w8a8 --samples 64 -o ./model-w8a8   # vLLM INT8 W8A8, smoothed
      qtk quantize ./model --method gguf --gguf-type Q4_K_M --gguf-type IQ4_XS -o ./model-gguf   # llama.cpp/Ollama
    """
    from ..quantize.base import QuantizeOptions
    from ..methods import get_method
    from ..quantize.run import quantize

    out = get_output()
    if bits is None:  # the method's own default: the first width it supports
        bits = get_method(method).bits[0]
    options = QuantizeOptions(
        method=method, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, calibration=calibration,
        samples=samples, seq_len=seq_len, seed=seed, chat_template=chat_template, text_field=text_field,
        allow_fewer=allow_fewer, device=device, smooth=smooth, smooth_alpha=smooth_alpha, gguf_type=gguf_type,
        imatrix=imatrix,
    )
    dest = output or _default_output(model, method, bits, group_size)
    with backend_session(out, "quantize", f"{Path(dest).name}", verbose=verbose) as progress:
        result = quantize(model, dest, options, revision=revision, overwrite=overwrite, log=out.info, warn=out.warn,
                          progress=progress)
    if out.json_mode:
        out.json(result.to_dict())
        return
    p = result.provenance
    cal = p.get("calibration")
    what = (f"{', '.join(p['options']['gguf_type'])}" if p["method"] == "gguf" else f"{p['options']['bits']}-bit")
    out.info(f"Done in {p['wall_s']:.0f} s on {p['device']}: {p['method']} {what}"
             + (f", calibration {cal['name']} ({cal['samples']} x {cal['seq_len']} tokens)" if cal else "")
             + (f", peak RSS {p['peak_rss_bytes'] / 1e9:.2f} GB" if p.get("peak_rss_bytes") else "")
             + (f", peak VRAM {p['peak_vram_bytes'] / 1e9:.2f} GB" if p.get("peak_vram_bytes") else ""))
    out.result(str(result.out))


@click.group()
def calibration() -> None:
    """Calibration sets shipped with qtk."""


@calibration.command("list")
@json_option
def calibration_list() -> None:
    """List the named calibration sets (name, kind, source, license)."""
    from ..quantize.calibration import list_sets

    out = get_output()
    sets = list_sets()
    if out.json_mode:
        out.json(sets)
        return
    table = Table(box=None)
    for col in ("name", "kind", "description", "license"):
        table.add_column(col)
    for s in sets:
        table.add_row(s["name"], s["kind"], s["description"], s["license"])
    out.table(table)
