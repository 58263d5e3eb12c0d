"""qtk plan: what a model needs in memory, from its config.json alone."""

from __future__ import annotations

import click

from .. import plan as planner
from ._options import json_option, quiet_option
from ._output import get_output

DEFAULT_FORMATS = "bf16,fp8,int4,gptq-g128,awq-g128,nf4,gguf-q8_0,gguf-q4_k_m"


@click.command("plan")
@click.argument("model")
@click.option("--context", default="1k,16k,128k", show_default=True, metavar="N[,N...]",
              help="Context lengths in tokens for the KV cache ('k' = 1024; 16000 is 16,000 tokens).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Concurrent sequences.")
@click.option("--kv-dtype", type=click.Choice(list(planner.KV_DTYPES)), default="fp16", show_default=True)
@click.option("--formats", default=DEFAULT_FORMATS, show_default=True, metavar="F[,F...]",
              help=f"Weight formats: {', '.join(planner.FORMATS)}.")
@click.option("--gpus", multiple=True, metavar="NAME=GB", help="Add GPUs to the fit table (repeatable).")
@click.option("--margin-gb", type=float, default=2.0, show_default=True,
              help="Per-GPU allowance for activations, CUDA context and fragmentation.")
@click.option("--utilization", type=click.FloatRange(0.1, 1.0), default=0.9, show_default=True,
              help="Fraction of each GPU's memory the server may use (vLLM's gpu_memory_utilization).")
@click.option("--revision", help="Revision when MODEL is a repo id.")
@json_option
@quiet_option
def plan_cmd(model, context, batch, kv_dtype, formats, gpus, margin_gb, utilization, revision):
    """Plan memory for MODEL before downloading it: parameters, weights per format, KV cache per
    context length, and which GPUs (alone or tensor-parallel over 2/4/8) hold it.

    MODEL is a config.json, a checkpoint directory, or a repo id (only its config.json is fetched,
    through qtk's downloader). Units: weights in GB (10^9 bytes), KV cache in GiB (2^30 bytes).
    A configuration fits when (weights + KV at the longest --context) / GPUs + --margin-gb is at most
    --utilization x the GPU's nominal memory.

    \b
    Examples:
      qtk plan meta-llama/Llama-3.1-8B-Instruct
      qtk plan ./config.json --context 8k,32k --batch 16 --kv-dtype fp8 --gpus MI300X=192 --json
    """
    out = get_output()
    cfg, source = planner.load_config(model, revision=revision)
    shape = planner.shape_from_config(cfg)
    result = planner.plan(shape, formats=[f.strip() for f in formats.split(",") if f.strip()],
                          contexts=planner.parse_context(context), batch=batch, kv_dtype=kv_dtype,
                          gpus=planner.parse_gpus(gpus), margin_gb=margin_gb, utilization=utilization)
    result["source"] = source
    if out.json_mode:
        out.json(result)
        return
    _print(result)


def _print(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(highlight=False)
    if not con.is_terminal:
        con.width = 200
    p, s = r["params"], r["shape"]
    moe = f", MoE {s['experts']} experts ({s['experts_per_token']} active)" if s["experts"] else ""
    con.print(f"[bold]{r['architecture']}[/bold] from {r['source']}: {p['total'] / 1e9:.2f} B parameters "
              f"({p['linear'] / 1e9:.2f} B in linear layers; {s['layers']} layers, hidden {s['hidden']}, "
              f"{s['heads']} heads / {s['kv_heads']} KV heads x {s['head_dim']}"
              f"{', tied embeddings' if s['tied_embeddings'] else ''}{moe})")
    kv = r["kv_cache"]
    t = Table(title=f"KV cache, {kv['dtype']}, batch {kv['batch']}", caption=f"{kv['bytes_per_token'] / 1024:.0f} KiB per token")
    t.add_column("context tokens", justify="right")
    t.add_column("GiB", justify="right")
    for row in kv["by_context"]:
        t.add_row(f"{row['tokens']:,}", f"{row['GiB']:.3f}")
    con.print(t)
    gpus = list(r["gpus"])
    a = r["assumptions"]
    t = Table(title=f"Weights (GB) and the fewest GPUs that hold weights + KV at {a['fit_context_tokens']:,} tokens "
                    f"(margin {a['margin_GB_per_gpu']:g} GB/GPU, utilization {a['utilization']:g})")
    t.add_column("format")
    t.add_column("weights GB", justify="right")
    for g in gpus:
        t.add_column(f"{g} ({r['gpus'][g]:g} GB)", justify="right")
    for row in r["formats"]:
        t.add_row(row["format"], f"{row['weight_GB']:.2f}",
                  *[f"{row['min_gpus'][g]}x" if g in row["min_gpus"] else "[red]no[/red]" for g in gpus])
    con.print(t)
    con.print("'Nx': tensor-parallel over N GPUs; 'no': not even over 8. GGUF sizes: each tensor at the type "
              "llama.cpp's quantizer gives it (metadata not counted); GPTQ/AWQ/NF4 keep embeddings and lm_head in 16-bit.")
