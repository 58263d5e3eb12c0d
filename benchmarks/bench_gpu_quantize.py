"""GPTQ and AWQ through `qtk quantize` on a Llama-3.1-8B-shaped checkpoint with random weights, built on
the machine itself (nothing to download): wall time, peak VRAM, peak RSS, per-layer time and the
extrapolation to the full depth.

    python benchmarks/bench_gpu_quantize.py                       # 8B shape, 128 x 512 calibration, CUDA
    python benchmarks/bench_gpu_quantize.py --depths 2 6          # 8B width at 2 and 6 layers -> per layer, x32
    python benchmarks/bench_gpu_quantize.py --shape 3b            # Llama-3.2-3B shape (28 layers)
    python benchmarks/bench_gpu_quantize.py --tiny                # a tiny shape on the CPU: proves the script
    python benchmarks/bench_gpu_quantize.py --json out.json

Targets on one H100 (issue 14): GPTQ <= 12 min and AWQ <= 15 min for the 8B shape, peak VRAM <= 12 GB.

Per depth in --depths (default: the shape's full depth) the checkpoint is built with that many decoder
layers (same width, same embeddings) and each method runs once in a fresh `qtk quantize` process. With
two or more depths, the per-layer time is the slope between the shallowest and the deepest run, and the
full-depth time is extrapolated as t(deepest) + slope x (full - deepest): an extrapolation, reported as
such. Peak VRAM of a layer-at-a-time method does not grow with depth; it is reported per run.

The tokenizer is byte-level (256 byte tokens + specials, a minimal chat template), written by this
script, so the checkpoint needs nothing from the Hub; token ids above 260 are simply never used.
Needs qtk with the gptq extra (gptqmodel) and a CUDA torch on the machine; --tiny needs only the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable

SHAPES = {
    # public config.json values (Llama-3.1-8B, Llama-3.2-3B)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               num_hidden_layers=32, vocab_size=128256, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
               num_hidden_layers=28, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=4096, tie_word_embeddings=False),
}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_tokenizer(out: Path) -> None:
    """A byte-level BPE without merges: every byte is one token (ids 0-255), plus 4 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet(), key=lambda c: ord(c)))}
    specials = ["<|begin|>", "<|end|>", "<|pad|>", "<|unk|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|end|>",
        "pad_token": "<|pad|>", "unk_token": "<|unk|>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": 131072}, indent=1))


def build_checkpoint(out: Path, shape: dict, layers: int, device: str, seed: int = 0) -> Path:
    """BF16 Llama checkpoint with random weights (std 0.02, norms 1), one safetensors shard per decoder
    layer (+ one for embeddings/head), generated on ``device`` and written shard by shard, so host memory
    holds one layer (or the embeddings) at a time. Reused when present."""
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file

    h, inter = shape["hidden_size"], shape["intermediate_size"]
    nh, kv, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    hd = h // nh
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s):
        return (torch.randn(*s, generator=g, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weight_map, total = {}, 0
        shards = [("embed", None)] + [("layer", i) for i in range(layers)]
        for k, (kind, i) in enumerate(shards):
            if kind == "embed":
                t = {"model.embed_tokens.weight": rnd(vocab, h), "model.norm.weight": ones(h)}
                if not shape["tie_word_embeddings"]:
                    t["lm_head.weight"] = rnd(vocab, h)
            else:
                p = f"model.layers.{i}."
                t = {p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(kv * hd, h),
                     p + "self_attn.v_proj.weight": rnd(kv * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
                     p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
                     p + "mlp.down_proj.weight": rnd(h, inter), p + "input_layernorm.weight": ones(h),
                     p + "post_attention_layernorm.weight": ones(h)}
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(t, tmp / name, metadata={"format": "pt"})
            weight_map.update({n: name for n in t})
            total += sum(v.numel() * v.element_size() for v in t.values())
            del t
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
               "max_position_embeddings": 131072, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "head_dim": hd,
               "bos_token_id": 256, "eos_token_id": 257,  # the byte tokenizer's <|begin|>, <|end|>
               **shape, "num_hidden_layers": layers}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        write_tokenizer(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run_qtk(src: Path, out: Path, method: str, args) -> dict:
    cmd = [PY, "-m", "qtk", "quantize", str(src), "--method", method, "--group-size", str(args.group_size),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--calibration", args.calibration,
           "--device", args.device, "-o", str(out), "--json"]
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        p = subprocess.Popen(cmd, stdout=so, stderr=se, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return {"error": f"exit {code}", "stderr_tail": stderr[-4000:], "wall_s": wall}
    prov = json.loads(stdout)
    return {"wall_s": wall, "quantize_s": prov.get("quantize_s"), "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_vram_bytes": prov.get("peak_vram_bytes"), "peak_rss_bytes": prov.get("peak_rss_bytes"),
            "method_details": prov.get("method_details", {}), "device": prov.get("device")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["8b", "3b"], default="8b")
    ap.add_argument("--tiny", action="store_true", help="tiny shape, 8 x 64 calibration, on the CPU (a smoke run)")
    ap.add_argument("--depths", nargs="+", type=int, help="decoder layers to build and run (default: the full depth)")
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calibration", default="chat")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--work", type=Path, help="where checkpoints are built (default: a temp dir, removed after)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shape_name = "tiny" if args.tiny else args.shape
    if args.tiny:
        args.device, args.samples, args.seq_len, args.group_size = "cpu", 8, 64, 64
    shape = SHAPES[shape_name]
    full = shape["num_hidden_layers"]
    depths = sorted(set(args.depths or [full]))

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_quantize: torch sees no CUDA GPU (use --tiny for the CPU smoke run)")
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    work = args.work or Path(tempfile.mkdtemp(prefix="qtk-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores" + (f", {gpu}" if gpu else ""),
              "shape": shape_name, "full_layers": full, "depths": depths,
              "calibration": {"set": args.calibration, "samples": args.samples, "seq_len": args.seq_len},
              "group_size": args.group_size, "runs": [], "extrapolated": {}}
    print(f"shape {shape_name} ({json.dumps(shape)}), depths {depths}, {args.samples} x {args.seq_len} calibration, "
          f"{args.device}{' ' + gpu if gpu else ''}", flush=True)
    try:
        for depth in depths:
            t0 = time.perf_counter()
            src = build_checkpoint(work / f"{shape_name}-{depth}L", shape, depth, args.device)
            print(f"built {depth} layers in {time.perf_counter() - t0:.0f} s", flush=True)
            for method in args.methods:
                r = run_qtk(src, work / f"{shape_name}-{depth}L-{method}", method, args)
                shutil.rmtree(work / f"{shape_name}-{depth}L-{method}", ignore_errors=True)
                r.update(layers=depth, method=method)
                report["runs"].append(r)
                if "error" in r:
                    print(f"{depth:3d} layers {method}: FAILED {r['error']}\n{r['stderr_tail']}", flush=True)
                else:
                    print(f"{depth:3d} layers {method:4s}: wall {r['wall_s']:7.1f} s (quantize {r['quantize_s']} s), "
                          f"peak VRAM {(r['peak_vram_bytes'] or 0) / 1e9:6.2f} GB, peak RSS {r['peak_rss_bytes'] / 1e9:6.2f} GB "
                          f"{r['method_details']}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(report, indent=2))
            shutil.rmtree(src, ignore_errors=True)
        for method in args.methods:
            ok = sorted((r["layers"], r["wall_s"]) for r in report["runs"] if r["method"] == method and "error" not in r)
            if len(ok) >= 2 and ok[-1][0] > ok[0][0]:
                (d0, t0_), (d1, t1) = ok[0], ok[-1]
                per_layer = (t1 - t0_) / (d1 - d0)
                est = t1 + per_layer * (full - d1)
                report["extrapolated"][method] = {"per_layer_s": per_layer, "full_layers": full, "full_wall_s_est": est,
                                                  "from_depths": [d0, d1], "note": "extrapolated, not measured"}
                print(f"{method}: {per_layer:.1f} s per layer -> {full} layers ~{est / 60:.1f} min (extrapolated)")
    finally:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
