"""Task accuracy per format on SmolLM2-135M-Instruct through qtk verify's task path (lm-eval 0.4.13).

    python benchmarks/bench_tasks.py [--formats bf16,gptq,nf4,fp8,gguf-q4_1,gguf-q4_k_m] [--limit N]
                                     [--device cpu] [--work .qtk-test-cache/bench-tasks] [--overhead] [--threads N]
                                     [--json out.json]

Each format is built once under --work (GPTQ g64 with 32 x 256 chat samples as in the demo, NF4, FP8
dynamic, GGUF Q4_K_M with an importance matrix; Q4_1 is the shipped GGUF), loaded like `qtk verify` loads
it, and evaluated on qtk_cloze (100 documents, or --limit) with the same task objects: accuracy ±
stderr, recovery vs BF16, documents/s (wall) and CPU seconds of the task pass (resource.getrusage:
this process and its threads). --overhead: on BF16, qtk's path (requests in slices of whole documents
for progress) against lm-eval's evaluator on the unwrapped HFLM, alternating, best of 2 each.
The machine is shared: the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

RECIPES = {  # format -> QuantizeOptions fields (SmolLM2's widths need group size 64)
    "gptq": {"method": "gptq", "group_size": 64, "samples": 32, "seq_len": 256, "calibration": "chat"},
    "nf4": {"method": "nf4"},
    "fp8": {"method": "fp8"},
    "gguf-q4_k_m": {"method": "gguf", "gguf_type": ("Q4_K_M",), "samples": 32, "seq_len": 256, "calibration": "chat"},
}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(fmt: str, bf16: Path, work: Path) -> str:
    from qtk.embedded import shipped_gguf
    from qtk.quantize.base import QuantizeOptions
    from qtk.methods import get_method
    from qtk.quantize.run import quantize

    if fmt == "bf16":
        return str(bf16)
    if fmt == "gguf-q4_1":
        return str(shipped_gguf())
    out = work / fmt
    if not out.exists():
        t0 = time.monotonic()
        recipe = RECIPES[fmt]  # bits unset: the method's first width (fp8: 8), as `qtk quantize` without --bits
        quantize(str(bf16), out, QuantizeOptions(**{"bits": get_method(recipe["method"]).bits[0], **recipe}))
        print(f"built {fmt} in {time.monotonic() - t0:.0f} s", flush=True)
    ggufs = sorted(out.glob("*.gguf"))
    return str(ggufs[0]) if ggufs else str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="bf16,gptq,nf4,fp8,gguf-q4_1,gguf-q4_k_m")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path(".qtk-test-cache") / "bench-tasks")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads and llama.cpp threads (default: theirs)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from qtk.embedded import build_bf16_checkpoint
    from qtk.verify.models import open_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from qtk.verify.tasks import evaluate_model, lm_for, load_tasks, task_recovery

    cache = Path(os.environ.get("QTK_TEST_CACHE", Path(__file__).resolve().parent.parent / ".qtk-test-cache"))
    bf16 = build_bf16_checkpoint(cache / "smollm2-135m-bf16")
    args.work.mkdir(parents=True, exist_ok=True)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    specs = {f: build(f, bf16, args.work) for f in formats}
    ts = load_tasks(["qtk_cloze"])
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "device": args.device, "limit": args.limit,
              "threads": args.threads,
              "load_before": os.getloadavg(), "rows": []}
    ref = None
    for fmt, spec in specs.items():
        m = open_model(spec, device=args.device, n_ctx=4096, threads=args.threads)
        lm = lm_for(m, max_length=4096)
        c0, t0 = cpu_s(), time.monotonic()
        res = evaluate_model(lm, ts, limit=args.limit, seed=0)["qtk_cloze"]
        c1, t1 = cpu_s(), time.monotonic()
        ref = ref or res
        row = {"format": fmt, "model": spec, "acc": res["value"], "stderr": res["stderr"], "docs": res["docs"],
               "wall_s": round(t1 - t0, 2), "cpu_s": round(c1 - c0, 2), "docs_per_s": round(res["docs"] / (t1 - t0), 2),
               "recovery_pct": task_recovery(ref, res), "metrics": res["metrics"]}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.overhead and fmt == "bf16":
            report["overhead"] = overhead(m, ts, args.limit)
            print(json.dumps(report["overhead"]), flush=True)
        del m, lm
    report["load_after"] = os.getloadavg()
    print(f"{'format':<12} {'acc %':>12} {'recovery':>9} {'docs/s':>7} {'CPU s':>7}")
    for r in report["rows"]:
        rec = f"{r['recovery_pct']:.1f}%" if r["recovery_pct"] is not None else "—"
        print(f"{r['format']:<12} {r['acc'] * 100:6.1f} ± {r['stderr'] * 100:3.1f} {rec:>9} {r['docs_per_s']:7.2f} "
              f"{r['cpu_s']:7.1f}")
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


def overhead(model, ts, limit) -> dict:
    """qtk's metered path vs lm-eval's evaluator on the bare LM, same model and tasks, alternating."""
    from lm_eval import evaluator

    from qtk.verify.tasks import BOOTSTRAP_ITERS, evaluate_model, lm_for

    lm = lm_for(model, max_length=4096)
    best = {"qtk": None, "lm_eval": None}
    for _ in range(2):
        for name in ("qtk", "lm_eval"):
            c0 = cpu_s()
            if name == "qtk":
                evaluate_model(lm, ts, limit=limit, seed=0)
            else:
                evaluator.evaluate(lm=lm, task_dict=ts.objects["qtk_cloze"], limit=limit,
                                   bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
            took = cpu_s() - c0
            best[name] = took if best[name] is None else min(best[name], took)
    return {"qtk_cpu_s": round(best["qtk"], 2), "lm_eval_cpu_s": round(best["lm_eval"], 2),
            "ratio": round(best["qtk"] / best["lm_eval"], 3)}


if __name__ == "__main__":
    main()
