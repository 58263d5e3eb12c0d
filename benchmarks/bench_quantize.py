"""qtk quantize per method on SmolLM2-135M-Instruct (real weights), against the backend called
directly with the same model, calibration tokens, parameters and device.

    python benchmarks/bench_quantize.py                       # gptq, awq, nf4 on all 30 layers
    python benchmarks/bench_quantize.py --methods gptq nf4 --samples 32 --seq-len 256 --json out.json
    python benchmarks/bench_quantize.py --device cuda --samples 128 --seq-len 512   # on a GPU

For each method: wall time of `qtk quantize` (a fresh process, as a user runs it) and of a script that
calls the backend directly (GPTQModel / transformers+bitsandbytes), peak RSS of each, output size,
and perplexity on held-out prose (`prose-heldout`, never used for calibration) vs the BF16 model.
The overhead ratio is qtk wall / direct wall, measured in the same run (target <= 1.05x).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
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

PY = sys.executable

DIRECT = r"""
import json, os, sys
args = json.loads(sys.argv[1])
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch, random, numpy as np
random.seed(args["seed"]); np.random.seed(args["seed"]); torch.manual_seed(args["seed"])
dev = args["device"]
if dev == "cuda":
    torch.cuda.manual_seed_all(args["seed"])
if args["method"] == "nf4":
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(args["src"], quantization_config=cfg, dtype=torch.bfloat16,
                                             device_map={"": 0} if dev == "cuda" else "cpu")
    m.save_pretrained(args["out"])
else:
    from gptqmodel import GPTQModel, GPTQConfig, AWQConfig, BACKEND
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in json.load(open(args["samples"]))]
    if args["method"] == "gptq":
        m = GPTQModel.load(args["src"], GPTQConfig(bits=4, group_size=args["group_size"], desc_act=False, sym=True), device=dev)
        m.quantize(rows, batch_size=1)
    else:
        m = GPTQModel.load(args["src"], AWQConfig(bits=4, group_size=args["group_size"], sym=False), device=dev)
        m.quantize(rows, batch_size=1, backend=BACKEND.AWQ_TORCH if dev == "cpu" else BACKEND.AUTO)
    m.save(args["out"])
vram = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
print(vram)
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def run(cmd: list[str], env=None) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{r.stderr[-3000:]}")
    return wall, r.stdout


def perplexity(path: Path, ids: list[int], device: str, window: int = 256) -> float:
    import torch

    from qtk.hfload import load_causal_lm

    model, _ = load_causal_lm(path, dtype=torch.bfloat16, device=device)
    x = torch.tensor([ids[i : i + window] for i in range(0, len(ids) - window + 1, window)], device=model.device)
    with torch.no_grad():
        return math.exp(model(x, labels=x).loss.float().item())


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["gptq", "nf4", "awq"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None, help="truncate to the first N layers (faster, for a smoke run)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="move qtk's outputs here (<DIR>/<method>) instead of deleting them")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from qtk.embedded import build_bf16_checkpoint
    from qtk.quantize.calibration import build_samples, load_calibration

    work = Path(tempfile.mkdtemp(prefix="qtk-bench-q-"))
    cache = Path(os.environ.get("QTK_TEST_CACHE", Path(__file__).resolve().parent.parent / ".qtk-test-cache"))
    src = build_bf16_checkpoint(cache / "smollm2-135m-bf16")
    if args.layers:
        src = build_bf16_checkpoint(cache / f"smollm2-135m-bf16-{args.layers}layers", num_layers=args.layers, base=src)
    tok = AutoTokenizer.from_pretrained(src)
    eval_ids = tok("\n\n".join(load_calibration("prose-heldout").documents))["input_ids"][: args.eval_tokens]
    samples = build_samples(load_calibration("chat"), tok, samples=args.samples, seq_len=args.seq_len, seed=0,
                            chat_template=True)
    (work / "samples.json").write_text(json.dumps(samples.input_ids))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    base_ppl = perplexity(src, eval_ids, device)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores" + (f", {gpu}" if gpu else ""),
              "device": device, "python": platform.python_version(),
              "versions": {m: importlib.metadata.version(m) for m in ("torch", "transformers", "gptqmodel", "bitsandbytes")
                           if importlib.util.find_spec(m.lower()) is not None},
              "model": str(src), "bf16_ppl": base_ppl, "bf16_bytes": size(src),
              "calibration": {"set": "chat", "samples": args.samples, "seq_len": args.seq_len},
              "eval_tokens": len(eval_ids), "methods": {}}
    print(f"BF16: ppl {base_ppl:.2f} on {len(eval_ids)} held-out tokens, {size(src) / 1e6:.0f} MB")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
    for method in args.methods:
        q_out, d_out = work / f"qtk-{method}", work / f"direct-{method}"
        # the direct call and qtk alternate first place by method, to spread any warm-cache advantage
        order = ["direct", "qtk"] if args.methods.index(method) % 2 == 0 else ["qtk", "direct"]
        res = {}
        for who in order:
            if who == "qtk":
                wall, out = run([PY, "-m", "qtk", "quantize", str(src), "--method", method, "--group-size",
                                 str(args.group_size), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                                 "--calibration", "chat", "--device", device, "-o", str(q_out), "--json"], env)
                prov = json.loads(out)
                res["qtk_s"], res["qtk_peak_rss_MB"] = wall, (prov.get("peak_rss_bytes") or 0) / 1e6
                res["qtk_peak_vram_MB"] = (prov.get("peak_vram_bytes") or 0) / 1e6
            else:
                payload = json.dumps({"method": method, "src": str(src), "out": str(d_out), "seed": 0, "device": device,
                                      "group_size": args.group_size, "samples": str(work / "samples.json")})
                wall, out = run([PY, "-c", DIRECT, payload], env)
                lines = out.strip().splitlines()
                res["direct_s"], res["direct_peak_rss_MB"] = wall, int(lines[-1]) / 1e3
                res["direct_peak_vram_MB"] = int(lines[-2]) / 1e6
        res["overhead_x"] = res["qtk_s"] / res["direct_s"]
        res["bytes"] = size(q_out)
        res["ppl"] = perplexity(q_out, eval_ids, device)
        res["ppl_x_bf16"] = res["ppl"] / base_ppl
        report["methods"][method] = res
        print(f"{method:5s} qtk {res['qtk_s']:7.1f} s  direct {res['direct_s']:7.1f} s  overhead {res['overhead_x']:.3f}x  "
              f"rss {res['qtk_peak_rss_MB']:.0f} MB  vram {res['qtk_peak_vram_MB']:.0f} MB  size {res['bytes'] / 1e6:.0f} MB  "
              f"ppl {res['ppl']:.2f} ({res['ppl_x_bf16']:.2f}x BF16)", flush=True)
        shutil.rmtree(d_out, ignore_errors=True)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.move(str(q_out), str(args.keep / method))
        if args.json:  # after every method, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
