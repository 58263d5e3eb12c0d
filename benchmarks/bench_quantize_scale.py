"""How `qtk quantize` scales: AWQ's speed against GPTQ, peak memory against model depth, and the
planner's predictions against what was measured. Every number comes from `qtk quantize` run as a user
runs it (a fresh process per run); CPU seconds (user + sys of that process) are reported beside wall
time because wall time on a shared machine measures the neighbours too.

    python benchmarks/bench_quantize_scale.py speed                  # SmolLM2-135M, all 30 layers
    python benchmarks/bench_quantize_scale.py speed --stock-layers 4  # + GPTQModel's own AWQ path on 4 layers
    python benchmarks/bench_quantize_scale.py speed --methods gptq awq --awq-variants grid20  # + AWQ, all 20 ratios
    python benchmarks/bench_quantize_scale.py memory --layers 8 16 32 --big   # synthetic Llama shapes
    python benchmarks/bench_quantize_scale.py resume --methods gptq --layers 30   # kill at half, re-run
    python benchmarks/bench_quantize_scale.py resume --methods gptq --from-cache  # the same, source in an HF cache
    python benchmarks/bench_quantize_scale.py speed --json out.json

speed: nf4, gptq and awq on the same model and calibration (group 64, 16 x 256 tokens by default),
held-out perplexity vs BF16; with --stock-layers N, AWQ through GPTQModel's stock path
(QTK_AWQ_SEARCH=stock) and through qtk's, plus GPTQ, on the first N real layers, back to back, so
the per-layer cost of each is measured in one run (the stock path takes > 10 min on all 30 layers).

memory: random-weight Llama checkpoints at SmolLM2's width (hidden 576) and the given depths, and at
Llama-3.2-1B's width (hidden 2048) at --wide-layers depths (with --big the full Llama-3.2-1B shape),
built here (no download); peak RSS of each method per depth, the growth per layer against one layer's
BF16 size, and the planner's prediction (qtk.plan.quantize_memory) against the measurement.

resume: a fresh run, then the same command killed (SIGKILL) once half the layers are checkpointed, then
the same command again: its time against the fresh run's, and its tensors against the fresh run's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CACHE = Path(os.environ.get("QTK_TEST_CACHE", ROOT / ".qtk-test-cache"))


def run_qtk(src: Path, out: Path, method: str, *, group_size: int, samples: int, seq_len: int,
            env_extra: dict | None = None) -> dict:
    """One `qtk quantize` in a fresh process: wall s, CPU s (user+sys), peak RSS, provenance details.

    Peak RSS is the process's own VmHWM (qtk's provenance): wait4's ru_maxrss would also count the
    parent's pages shared into the child between fork and exec."""
    cmd = [PY, "-m", "qtk", "quantize", str(src), "--method", method, "--group-size", str(group_size),
           "--samples", str(samples), "--seq-len", str(seq_len), "--calibration", "chat", "--device", "cpu",
           "-o", str(out), "--json"]
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", **(env_extra or {})}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        p = subprocess.Popen(cmd, stdout=so, stderr=se, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"qtk quantize {method} on {src.name} exited {p.returncode}:\n{stderr[-3000:]}")
    prov = json.loads(stdout)
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "quantize_s": prov.get("quantize_s"),
            "peak_rss_bytes": prov.get("peak_rss_bytes"), "method_details": prov.get("method_details", {})}


def perplexity(path: Path, ids: list[int], window: int = 256) -> float:
    import torch

    from qtk.hfload import load_causal_lm

    model, _ = load_causal_lm(path, dtype=torch.bfloat16, device="cpu")
    x = torch.tensor([ids[i: i + window] for i in range(0, len(ids) - window + 1, window)])
    with torch.no_grad():
        return math.exp(model(x, labels=x).loss.float().item())


def spliced_perplexity(full: Path, quantized: Path, ids: list[int], window: int = 256) -> float:
    """Perplexity of the full BF16 model with its first N decoder layers replaced by the N quantized
    layers of ``quantized`` (a checkpoint of the model truncated to N layers). A truncated model alone
    predicts nothing (ppl in the millions); this keeps the quality comparison meaningful."""
    import torch

    from qtk.hfload import load_causal_lm

    model, _ = load_causal_lm(full, dtype=torch.bfloat16, device="cpu")
    qmodel, _ = load_causal_lm(quantized, dtype=torch.bfloat16, device="cpu")
    n = len(qmodel.model.layers)
    for i in range(n):
        model.model.layers[i] = qmodel.model.layers[i]
    x = torch.tensor([ids[i: i + window] for i in range(0, len(ids) - window + 1, window)])
    with torch.no_grad():
        return math.exp(model(x, labels=x).loss.float().item())


def machine() -> dict:
    import importlib.metadata as md

    return {"machine": f"{platform.machine()} {os.cpu_count()} cores (shared with other work: wall times are noisy; "
                       "compare CPU seconds and ratios within one run)",
            "python": platform.python_version(),
            "versions": {m: md.version(m) for m in ("torch", "transformers", "gptqmodel", "bitsandbytes")}}


# ------------------------------------------------------------------------------------------------- speed

def speed(args) -> dict:
    from transformers import AutoTokenizer

    from qtk.embedded import build_bf16_checkpoint
    from qtk.quantize.calibration import load_calibration

    full = build_bf16_checkpoint(CACHE / "smollm2-135m-bf16")
    tok = AutoTokenizer.from_pretrained(full)
    eval_ids = tok("\n\n".join(load_calibration("prose-heldout").documents))["input_ids"][: args.eval_tokens]
    work = Path(tempfile.mkdtemp(prefix="qtk-bench-scale-"))
    report = {**machine(), "calibration": {"set": "chat", "samples": args.samples, "seq_len": args.seq_len},
              "group_size": args.group_size, "eval_tokens": len(eval_ids), "runs": []}

    def one(src: Path, layers: int, method: str, variant: str, env: dict | None = None) -> dict:
        out = work / f"{method}-{variant}-{layers}"
        r = run_qtk(src, out, method, group_size=args.group_size, samples=args.samples, seq_len=args.seq_len,
                    env_extra=env)
        # a truncated copy: its quantized layers spliced into the full BF16 model
        ppl = perplexity(out, eval_ids) if layers == 30 else spliced_perplexity(full, out, eval_ids)
        r.update(model_layers=layers, method=method, variant=variant, ppl=ppl)
        shutil.rmtree(out, ignore_errors=True)
        report["runs"].append(r)
        print(f"{layers:2d} layers  {method:4s} {variant:6s}  wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
              f"rss {r['peak_rss_bytes'] / 1e9:.2f} GB  ppl {r['ppl']:.3f}  {r['method_details']}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return r

    bf16 = {}
    if args.stock_layers:
        n = args.stock_layers
        src = build_bf16_checkpoint(CACHE / f"smollm2-135m-bf16-{n}layers", num_layers=n, base=full)
        bf16[n] = perplexity(full, eval_ids)  # the comparison splices the N quantized layers into the full model
        print(f"first {n} layers quantized, the rest BF16; bf16 ppl {bf16[n]:.3f}", flush=True)
        # back to back: the anchor (gptq), qtk's AWQ, GPTQModel's stock AWQ path
        g = one(src, n, "gptq", "qtk")
        a = one(src, n, "awq", "qtk")
        s = one(src, n, "awq", "stock", {"QTK_AWQ_SEARCH": "stock"})
        report["stock_compare"] = {
            "layers": n, "bf16_ppl": bf16[n],
            "awq_stock_over_qtk_cpu": s["cpu_s"] / a["cpu_s"], "awq_stock_over_qtk_wall": s["wall_s"] / a["wall_s"],
            "awq_qtk_over_gptq_cpu": a["cpu_s"] / g["cpu_s"], "awq_stock_over_gptq_cpu": s["cpu_s"] / g["cpu_s"],
            "ppl_qtk_over_stock": a["ppl"] / s["ppl"]}
        print(json.dumps(report["stock_compare"], indent=1), flush=True)
    if not args.skip_full:
        layers = 30
        bf16[layers] = perplexity(full, eval_ids)
        print(f"{layers:2d} layers  bf16 ppl {bf16[layers]:.3f}", flush=True)
        res = {m: one(full, layers, m, "qtk") for m in args.methods}
        # AWQ variants on the same model and calibration: qtk's code with the stock 20-ratio grid, GPTQModel's
        # own path (slow: > 10 min of CPU)
        variants = {"grid20": {"QTK_AWQ_SCALE_GRID": "full"}, "stock": {"QTK_AWQ_SEARCH": "stock"}}
        extra = {v: one(full, layers, "awq", v, variants[v]) for v in args.awq_variants}
        if "gptq" in res and "awq" in res:
            g, a = res["gptq"], res["awq"]
            report["full_compare"] = {
                "awq_over_gptq_cpu": a["cpu_s"] / g["cpu_s"], "awq_over_gptq_wall": a["wall_s"] / g["wall_s"],
                **{f"awq_{v}_over_gptq_cpu": r["cpu_s"] / g["cpu_s"] for v, r in extra.items()},
                **{f"awq_ppl_over_awq_{v}": a["ppl"] / r["ppl"] for v, r in extra.items()},
                **{f"{m}_ppl_x_bf16": r["ppl"] / bf16[layers] for m, r in res.items()}}
            print(json.dumps(report["full_compare"], indent=1), flush=True)
    report["bf16_ppl"] = bf16
    shutil.rmtree(work, ignore_errors=True)
    return report


# ------------------------------------------------------------------------------------------------ memory

SMOL_WIDTH = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                  vocab_size=49152, tie_word_embeddings=True)
# Llama-3.2-1B's width (a layer is 121 MB in BF16: the growth per layer stands out of the noise), small vocab
WIDE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=49152, tie_word_embeddings=True)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, tie_word_embeddings=True, num_hidden_layers=16)


def synthetic_llama(out: Path, tokenizer_from: Path, layers: int, shape: dict, seed: int = 0) -> Path:
    """A BF16 Llama checkpoint with random weights (std 0.02, norms 1), SmolLM2's tokenizer; written one
    tensor at a time (no model object), atomically; reused when present."""
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file

    h, i, nh, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = h // nh
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "max_position_embeddings": 8192, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "bos_token_id": 1,
           "eos_token_id": 2, "head_dim": hd, **shape, "num_hidden_layers": layers}
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rnd(shape["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not shape.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = rnd(shape["vocab_size"], h)
    for n in range(layers):
        p = f"model.layers.{n}."
        tensors |= {p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(kv * hd, h),
                    p + "self_attn.v_proj.weight": rnd(kv * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
                    p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                    p + "mlp.down_proj.weight": rnd(h, i),
                    p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (tokenizer_from / name).is_file():
                shutil.copyfile(tokenizer_from / name, tmp / name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def memory(args) -> dict:
    from qtk.embedded import build_bf16_checkpoint
    from qtk.plan import quantize_memory, shape_from_config

    tok_src = build_bf16_checkpoint(CACHE / "smollm2-135m-bf16")
    work = Path(tempfile.mkdtemp(prefix="qtk-bench-mem-"))
    models = [(f"smol-width-{n}L", n, SMOL_WIDTH) for n in args.layers]
    models += [(f"wide-{n}L", n, WIDE) for n in args.wide_layers]
    if args.big:
        models.append(("llama-1B-shape", LLAMA_1B["num_hidden_layers"], LLAMA_1B))
    report = {**machine(), "calibration": {"samples": args.samples, "seq_len": args.seq_len}, "runs": []}
    for name, layers, shape in models:
        src = synthetic_llama(CACHE / f"synthetic-{name}", tok_src, layers, shape)
        cfg = json.loads((src / "config.json").read_text())
        plan_shape = shape_from_config(cfg)
        layer_bf16 = 2 * (plan_shape.linear + plan_shape.params["norms"]) // layers
        for method in args.methods:
            r = run_qtk(src, work / f"{name}-{method}", method, group_size=args.group_size, samples=args.samples,
                        seq_len=args.seq_len)
            shutil.rmtree(work / f"{name}-{method}", ignore_errors=True)
            pred = quantize_memory(plan_shape, method, device="cpu", group_size=args.group_size,
                                   samples=args.samples, seq_len=args.seq_len)
            r.update(model=name, layers=layers, method=method, bf16_bytes=(src / "model.safetensors").stat().st_size,
                     layer_bf16_bytes=layer_bf16, predicted_rss_bytes=pred["host_bytes"],
                     predicted_over_measured=pred["host_bytes"] / r["peak_rss_bytes"])
            report["runs"].append(r)
            print(f"{name:16s} {method:4s}  bf16 {r['bf16_bytes'] / 1e6:7.0f} MB  peak RSS {r['peak_rss_bytes'] / 1e6:7.0f} MB"
                  f"  predicted {pred['host_bytes'] / 1e6:7.0f} MB ({r['predicted_over_measured']:.2f}x)"
                  f"  wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s", flush=True)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
    # growth per extra layer (SmolLM2 width), per method, vs one layer's BF16 bytes
    growth = {}
    for family in ("smol-width", "wide"):
        for method in args.methods:
            pts = sorted((r["layers"], r["peak_rss_bytes"], r["layer_bf16_bytes"]) for r in report["runs"]
                         if r["method"] == method and r["model"].startswith(family + "-"))
            if len(pts) >= 2:
                (l0, m0, lb), (l1, m1, _) = pts[0], pts[-1]
                growth[f"{family}/{method}"] = {"bytes_per_layer": (m1 - m0) / (l1 - l0), "layer_bf16_bytes": lb,
                                                "fraction_of_a_layer": (m1 - m0) / (l1 - l0) / lb}
    report["growth_per_layer"] = growth
    print(json.dumps(growth, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return report


# ------------------------------------------------------------------------------------------------ resume

def _published_layers(work: Path) -> int:
    try:
        store = work / "gptqmodel-checkpoint"
        ref = json.loads((store / "CURRENT").read_text())["generations"][0]
        return int(json.loads((store / "objects" / ref).read_bytes())["cursor"])
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    names = sorted(f.name for f in a.glob("*.safetensors"))
    if names != sorted(f.name for f in b.glob("*.safetensors")):
        return False
    for n in names:
        x, y = load_file(a / n), load_file(b / n)
        if sorted(x) != sorted(y) or any(not x[k].view(-1).view(__import__("torch").uint8).equal(
                y[k].view(-1).view(__import__("torch").uint8)) for k in x):
            return False
    return True


def _as_hf_cache(src: Path, hub: Path, repo_id: str) -> str:
    """``src`` laid out as an HF-cache snapshot under ``hub`` (blobs/ named by sha256, hardlinked where the
    filesystem allows; snapshots/<commit>/ symlinks into them; refs/main), as `qtk pull` leaves a repo."""
    import hashlib

    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        with open(f, "rb") as fh:
            blob = repo / "blobs" / hashlib.file_digest(fh, "sha256").hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            try:
                os.link(f, blob)
            except OSError:
                shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo_id


def resume(args) -> dict:
    """Fresh run, then the same command killed (SIGKILL) once half the layers are checkpointed, then the
    same command again: its time against the fresh run's, and its tensors against the fresh run's."""
    import signal

    from qtk.embedded import build_bf16_checkpoint

    full = build_bf16_checkpoint(CACHE / "smollm2-135m-bf16")
    src = full if args.layers == 30 else build_bf16_checkpoint(
        CACHE / f"smollm2-135m-bf16-{args.layers}layers", num_layers=args.layers, base=full)
    work = Path(tempfile.mkdtemp(prefix="qtk-bench-resume-"))
    report = {**machine(), "model_layers": args.layers, "from_cache": args.from_cache, "runs": {}}
    kw = dict(group_size=args.group_size, samples=args.samples, seq_len=args.seq_len)
    # --from-cache: the killed and the resumed run quantize a repo id from an HF cache (offline), the fresh
    # run (the anchor for time and bytes) the plain directory
    cache_env = {"HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1"} if args.from_cache else {}
    # a checkpoint after every layer, so "killed at half" is half whatever the cadence (QTK_RESUME_EVERY: by
    # default a checkpoint waits for elapsed time, README "Resume")
    cache_env["QTK_RESUME_EVERY"] = "layer"
    spec = Path(_as_hf_cache(src, work / "hf" / "hub", "bench/smollm2")) if args.from_cache else src
    for method in args.methods:
        fresh = run_qtk(src, work / f"{method}-fresh", method, **kw)
        out = work / f"{method}-resumed"
        cmd = [PY, "-m", "qtk", "quantize", str(spec), "--method", method, "--group-size", str(args.group_size),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--calibration", "chat",
               "--device", "cpu", "-o", str(out), "--json"]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2", **cache_env})
        ck = work / f".{out.name}.qtk-work"
        while _published_layers(ck) < args.layers // 2 and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed_after = time.perf_counter() - t0
        published = _published_layers(ck)
        resumed = run_qtk(spec, out, method, **kw, env_extra=cache_env)
        r = {"fresh": fresh, "killed_after_s": killed_after, "layers_published_at_kill": published,
             "resumed": resumed, "resumed_over_fresh_wall": resumed["wall_s"] / fresh["wall_s"],
             "resumed_over_fresh_cpu": resumed["cpu_s"] / fresh["cpu_s"],
             "same_tensors": _same_tensors(work / f"{method}-fresh", out)}
        report["runs"][method] = r
        print(f"{method}: fresh wall {fresh['wall_s']:.1f} s cpu {fresh['cpu_s']:.1f} s; killed after "
              f"{killed_after:.1f} s with {published}/{args.layers} layers published; resumed wall "
              f"{resumed['wall_s']:.1f} s cpu {resumed['cpu_s']:.1f} s ({r['resumed_over_fresh_wall']:.2f}x wall, "
              f"{r['resumed_over_fresh_cpu']:.2f}x cpu) {resumed['method_details']}; same tensors: {r['same_tensors']}",
              flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--methods", nargs="+", default=["nf4", "gptq", "awq"])
    s.add_argument("--stock-layers", type=int, default=0, help="also compare GPTQModel's stock AWQ on N layers")
    s.add_argument("--skip-full", action="store_true", help="only the --stock-layers comparison")
    s.add_argument("--awq-variants", nargs="*", default=[], choices=["grid20", "stock"],
                   help="also AWQ on all layers with the stock 20-ratio scale grid (qtk's code) / GPTQModel's own path")
    s.add_argument("--eval-tokens", type=int, default=2048)
    rs = sub.add_parser("resume")
    rs.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    rs.add_argument("--layers", type=int, default=30, help="SmolLM2's first N layers (30: all)")
    rs.add_argument("--from-cache", action="store_true",
                    help="kill and resume a run of a repo id from an HF cache (the fresh run: the plain dir)")
    m = sub.add_parser("memory")
    m.add_argument("--methods", nargs="+", default=["nf4", "gptq", "awq"])
    m.add_argument("--layers", nargs="+", type=int, default=[8, 16, 32])
    m.add_argument("--wide-layers", nargs="*", type=int, default=[2, 6], help="depths at Llama-1B's width")
    m.add_argument("--big", action="store_true", help="add a Llama-3.2-1B shape (2.5 GB BF16)")
    for p, samples, seq in ((s, 16, 256), (m, 8, 256), (rs, 16, 256)):
        p.add_argument("--samples", type=int, default=samples)
        p.add_argument("--seq-len", type=int, default=seq)
        p.add_argument("--group-size", type=int, default=64)
        p.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = {"speed": speed, "memory": memory, "resume": resume}[args.cmd](args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
