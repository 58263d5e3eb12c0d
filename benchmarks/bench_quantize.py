"""qtk quantize per method on SmolLM2-135M-Instruct (real weights), against the backend called
directly with the same model, calibration tokens, parameters, seed, threads and device, side by side.

    python benchmarks/bench_quantize.py                       # gptq, nf4, awq on all 30 layers
    python benchmarks/bench_quantize.py --methods gptq --samples 16 --seq-len 256 --rounds 2 --json out.json
    python benchmarks/bench_quantize.py --methods gptq awq --also-every-layer gptq   # + per-layer checkpoints
    python benchmarks/bench_quantize.py --device cuda --samples 128 --seq-len 512   # on a GPU

Each measured run is a fresh process, as a user runs it: `qtk quantize`, and a script that calls the
backend directly (GPTQModel / transformers+bitsandbytes). For each: wall time and CPU seconds (user + sys
of the process tree, from getrusage(RUSAGE_CHILDREN) around it), the load average before and after, peak
RSS, output size, and perplexity on held-out prose (`prose-heldout`, never used for calibration) vs BF16.
Printed per method and round: qtk / direct in CPU seconds and in wall time (issue 23's goal for GPTQ:
<= 1.10x), and qtk's AWQ / GPTQ (goal <= 3x). On a shared machine compare the CPU ratios; the wall
ratios carry the neighbours' load. Rounds alternate which of qtk and direct runs first.

The direct AWQ call is GPTQModel's stock search (~10x qtk's CPU time on this model): opt in with
`--direct-methods gptq nf4 awq`. `--also-every-layer gptq` adds a `qtk quantize` with QTK_RESUME_EVERY=layer
(a resume checkpoint after every layer: qtk's cadence before issue 23's fix) beside the default.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
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
        m = GPTQModel.load(args["src"], GPTQConfig(bits=4, group_size=args["group_size"], desc_act=args["desc_act"],
                                                   sym=True), device=dev)
        m.quantize(rows, batch_size=1)
    else:
        m = GPTQModel.load(args["src"], AWQConfig(bits=4, group_size=args["group_size"], sym=False), device=dev)
        m.quantize(rows, batch_size=1, backend=BACKEND.AWQ_TORCH if dev == "cpu" else BACKEND.AUTO)
    m.save(args["out"])
vram = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
print(json.dumps({"torch_threads": torch.get_num_threads(), "peak_vram_bytes": vram,
                  "peak_rss_bytes": int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024}))
"""


def run(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` to completion: its stdout, wall seconds, CPU seconds (user + sys of the process tree)
    and the 1-minute load average before and after."""
    before, load0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0], time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed:\n{r.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"stdout": r.stdout, "wall_s": wall, "cpu_s": cpu, "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def perplexity(path: Path, ids: list[int], device: str, window: int = 256) -> float:
    import torch

    from qtk.hfload import load_causal_lm

    model, _ = load_causal_lm(path, dtype=torch.bfloat16, device=device)
    x = torch.tensor([ids[i : i + window] for i in range(0, len(ids) - window + 1, window)], device=model.device)
    with torch.no_grad():
        return math.exp(model(x, labels=x).loss.float().item())


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def qtk_run(args, src: Path, method: str, out: Path, env: dict) -> dict:
    cmd = [PY, "-m", "qtk", "quantize", str(src), "--method", method, "--group-size", str(args.group_size),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--calibration", "chat",
           "--seed", str(args.seed), "--desc-act" if args.desc_act else "--no-desc-act", "--device", args.device,
           "-o", str(out), "--json"]
    r = run(cmd, env)
    prov = json.loads(r.pop("stdout"))
    details = prov.get("method_details") or {}
    return {**r, "peak_rss_MB": (prov.get("peak_rss_bytes") or 0) / 1e6,
            "peak_vram_MB": (prov.get("peak_vram_bytes") or 0) / 1e6, "torch_threads": prov.get("torch_threads"),
            "resume_checkpoints": details.get("resume_checkpoints")}


def direct_run(args, src: Path, method: str, out: Path, samples: Path, env: dict) -> dict:
    payload = json.dumps({"method": method, "src": str(src), "out": str(out), "seed": args.seed, "device": args.device,
                          "group_size": args.group_size, "desc_act": args.desc_act, "samples": str(samples)})
    r = run([PY, "-c", DIRECT, payload], env)
    facts = json.loads(r.pop("stdout").strip().splitlines()[-1])
    return {**r, "peak_rss_MB": facts["peak_rss_bytes"] / 1e6, "peak_vram_MB": facts["peak_vram_bytes"] / 1e6,
            "torch_threads": facts["torch_threads"]}


def one_method(args, src: Path, method: str, rnd: int, work: Path, env: dict, eval_ids, base_ppl) -> dict:
    """qtk and (where asked) the direct call for one method, in alternating order; ratios and quality."""
    runs = {"qtk": lambda: qtk_run(args, src, method, work / f"qtk-{method}", env)}
    if method in args.direct_methods:
        runs["direct"] = lambda: direct_run(args, src, method, work / f"direct-{method}", work / "samples.json", env)
    if method in args.also_every_layer:
        runs["qtk_every_layer"] = lambda: qtk_run(args, src, method, work / f"qtk-{method}-every-layer",
                                                  {**env, "QTK_RESUME_EVERY": "layer"})
    order = list(runs) if (rnd + args.methods.index(method)) % 2 == 0 else list(reversed(runs))
    res: dict = {"order": order}
    for who in order:
        res[who] = runs[who]()
    q = res["qtk"]
    for other in ("direct", "qtk_every_layer"):
        if other in res:
            res[f"qtk_over_{other}_cpu"] = q["cpu_s"] / res[other]["cpu_s"]
            res[f"qtk_over_{other}_wall"] = q["wall_s"] / res[other]["wall_s"]
    q_out = work / f"qtk-{method}"
    res["bytes"] = size(q_out)
    res["ppl"] = perplexity(q_out, eval_ids, args.device)
    res["ppl_x_bf16"] = res["ppl"] / base_ppl
    for d in (q_out, work / f"direct-{method}", work / f"qtk-{method}-every-layer"):
        if args.keep and d == q_out:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(args.keep / method, ignore_errors=True)
            shutil.move(str(d), str(args.keep / method))
        shutil.rmtree(d, ignore_errors=True)
    return res


def line(method: str, rnd: int, res: dict) -> str:
    q = res["qtk"]
    text = (f"{method:5s} r{rnd} qtk {q['wall_s']:7.1f} s wall {q['cpu_s']:7.1f} CPU s (load {q['load'][0]:.1f}-"
            f"{q['load'][1]:.1f}, threads {q['torch_threads']})")
    if "direct" in res:
        d = res["direct"]
        text += (f" | direct {d['wall_s']:7.1f} s wall {d['cpu_s']:7.1f} CPU s (load {d['load'][0]:.1f}-{d['load'][1]:.1f}, "
                 f"threads {d['torch_threads']}) | qtk/direct CPU {res['qtk_over_direct_cpu']:.3f}x "
                 f"wall {res['qtk_over_direct_wall']:.3f}x")
    if "qtk_every_layer" in res:
        e = res["qtk_every_layer"]
        text += (f" | every-layer checkpoints {e['wall_s']:.1f} s wall {e['cpu_s']:.1f} CPU s: default/every-layer "
                 f"CPU {res['qtk_over_qtk_every_layer_cpu']:.3f}x")
    ck = q.get("resume_checkpoints")
    if ck:
        text += f" | checkpoints {ck.get('written')} ({ck.get('seconds')} s)"
    return text + f" | rss {q['peak_rss_MB']:.0f} MB, {res['bytes'] / 1e6:.0f} MB, ppl {res['ppl']:.2f} ({res['ppl_x_bf16']:.3f}x BF16)"


def summary(report: dict) -> list[str]:
    """Medians over rounds: qtk / direct per method, AWQ / GPTQ of qtk (from the same rounds)."""
    out = []
    for method, rounds in report["methods"].items():
        names = {"direct": "the backend called directly", "qtk_every_layer": "qtk with a checkpoint per layer"}
        for other, goal in (("direct", " (goal <= 1.10x)" if method == "gptq" else ""), ("qtk_every_layer", "")):
            cpu = [r[f"qtk_over_{other}_cpu"] for r in rounds if f"qtk_over_{other}_cpu" in r]
            wall = [r[f"qtk_over_{other}_wall"] for r in rounds if f"qtk_over_{other}_wall" in r]
            if cpu:
                out.append(f"{method}: qtk / {names[other]}, median over {len(cpu)} round(s): CPU "
                           f"{statistics.median(cpu):.3f}x{goal}, wall {statistics.median(wall):.3f}x")
    g, a = report["methods"].get("gptq"), report["methods"].get("awq")
    if g and a:
        cpu = [y["qtk"]["cpu_s"] / x["qtk"]["cpu_s"] for x, y in zip(g, a)]
        wall = [y["qtk"]["wall_s"] / x["qtk"]["wall_s"] for x, y in zip(g, a)]
        out.append(f"qtk AWQ / GPTQ median over {len(cpu)} round(s): CPU {statistics.median(cpu):.2f}x (goal <= 3x), "
                   f"wall {statistics.median(wall):.2f}x; ppl AWQ {a[-1]['ppl']:.3f} GPTQ {g[-1]['ppl']:.3f}")
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["gptq", "nf4", "awq"])
    ap.add_argument("--direct-methods", nargs="*", default=["gptq", "nf4"],
                    help="methods also run through the backend directly (awq: GPTQModel's stock search, slow)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: inherited)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--also-every-layer", nargs="*", default=[], metavar="METHOD",
                    help="for these methods (gptq, awq) also run qtk with QTK_RESUME_EVERY=layer (a resume checkpoint "
                         "after every layer, the cadence before issue 23's fix)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None, help="truncate to the first N layers (faster, for a smoke run)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="move qtk's outputs here (<DIR>/<method>) instead of deleting them")
    return ap.parse_args()


def prepare(args, work: Path) -> tuple[Path, list[int], float]:
    """The BF16 model (truncated with --layers), the held-out evaluation ids, its perplexity; writes the
    calibration token ids `qtk quantize --calibration chat --seed S` builds to work/samples.json for the
    direct call."""
    import torch
    from transformers import AutoTokenizer

    from qtk.embedded import build_bf16_checkpoint
    from qtk.quantize.calibration import build_samples, load_calibration

    cache = Path(os.environ.get("QTK_TEST_CACHE", Path(__file__).resolve().parent.parent / ".qtk-test-cache"))
    src = build_bf16_checkpoint(cache / "smollm2-135m-bf16")
    if args.layers:
        src = build_bf16_checkpoint(cache / f"smollm2-135m-bf16-{args.layers}layers", num_layers=args.layers, base=src)
    tok = AutoTokenizer.from_pretrained(src)
    eval_ids = tok("\n\n".join(load_calibration("prose-heldout").documents))["input_ids"][: args.eval_tokens]
    samples = build_samples(load_calibration("chat"), tok, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                            chat_template=True)
    (work / "samples.json").write_text(json.dumps(samples.input_ids))
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return src, eval_ids, perplexity(src, eval_ids, args.device)


def main() -> None:
    import torch

    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="qtk-bench-q-"))
    src, eval_ids, base_ppl = prepare(args, work)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_DISABLE_TELEMETRY": "1",
           **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores" + (f", {gpu}" if gpu else ""),
              "device": args.device, "python": platform.python_version(), "load_at_start": os.getloadavg(),
              "versions": {m: importlib.metadata.version(m) for m in ("torch", "transformers", "gptqmodel", "bitsandbytes")
                           if importlib.util.find_spec(m.lower()) is not None},
              "model": str(src), "bf16_ppl": base_ppl, "bf16_bytes": size(src),
              "settings": {"calibration": "chat", "samples": args.samples, "seq_len": args.seq_len,
                           "group_size": args.group_size, "desc_act": args.desc_act, "seed": args.seed,
                           "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS"), "GPTQMODEL_CPU_WORKERS": "2"},
              "eval_tokens": len(eval_ids), "methods": {}}
    print(f"BF16: ppl {base_ppl:.2f} on {len(eval_ids)} held-out tokens, {size(src) / 1e6:.0f} MB; load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for rnd in range(args.rounds):
        for method in args.methods:
            res = one_method(args, src, method, rnd, work, env, eval_ids, base_ppl)
            report["methods"].setdefault(method, []).append(res)
            print(line(method, rnd, res), flush=True)
            if args.json:  # after every method, so a run cut short keeps what it measured
                args.json.write_text(json.dumps(report, indent=2))
    report["summary"] = summary(report)
    print("\n".join(report["summary"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
