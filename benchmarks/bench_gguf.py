"""qtk quantize --method gguf on SmolLM2-135M-Instruct (real weights, all 30 layers, CPU): quality against
BF16 on held-out text, the cost of conversion + importance matrix + Q4_K_M, and the planner's sizes.

    python benchmarks/bench_gguf.py                          # 64 x 256 calibration tokens, 16k eval tokens
    python benchmarks/bench_gguf.py --samples 128 --seq-len 512 --max-tokens 32768 --json out.json
    python benchmarks/bench_gguf.py --gptq ./smol-gptq-g64    # reuse a GPTQ g64 build (same calibration!)

Runs, each a fresh `qtk quantize` process as a user runs it (CPU seconds of the child, wall, parts from
its provenance):
  A  Q4_K_M with the importance matrix: the timed path (conversion + imatrix + Q4_K_M)
  B  BF16, Q8_0, IQ4_XS with the importance matrix (the same calibration tokens)
  C  Q4_K_M --no-imatrix
  G  GPTQ 4-bit group 64 on the same calibration tokens (qtk's own method, for comparison)
then one `qtk verify` pass (its protocol: llama.cpp's perplexity windows, second half scored, KL on the
reference's tokens) of all of them against the BF16 checkpoint on `prose-heldout` (never calibrated on).
The BF16 GGUF shows the floor: llama.cpp's numerics against transformers' on the same weights.
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

ROOT = Path(__file__).resolve().parent.parent


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def quantize(src: Path, out: Path, args: list[str], env: dict) -> dict:
    """One `qtk quantize` process: wall, CPU s (user + sys of the child and its children), provenance."""
    if (out / "qtk_provenance.json").is_file():
        prov = json.loads((out / "qtk_provenance.json").read_text())
        return {"out": str(out), "wall_s": None, "cpu_s": None, "reused": True, "provenance": prov}
    cmd = [sys.executable, "-m", "qtk", "quantize", str(src), "-o", str(out), "--device", "cpu", "--json", *args]
    c0, t0 = _cpu_children(), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    prov = json.loads((out / "qtk_provenance.json").read_text())
    return {"out": str(out), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "reused": False, "provenance": prov}


def parts(run: dict) -> dict:
    d = run["provenance"]["method_details"]
    out = {"convert": (d["converter"]["seconds"], d["converter"]["cpu_seconds"])}
    if "imatrix" in d:
        out["imatrix"] = (d["imatrix"]["seconds"], d["imatrix"]["cpu_seconds"])
    for t, f in d["files"].items():
        out[t] = (f["seconds"], f["cpu_seconds"])
    return out


def plan_check(src: Path, files: dict[str, Path]) -> list[dict]:
    from qtk.hfload import read_config
    from qtk.plan import gguf_weight_bytes, shape_from_config

    shape = shape_from_config(read_config(src, missing="no config.json"))
    rows = []
    for label, path in files.items():
        t = label.split()[0]
        imatrix = "no imatrix" not in label
        planned = gguf_weight_bytes(shape, t, imatrix=imatrix)
        size = path.stat().st_size
        rows.append({"file": label, "planned_bytes": planned, "file_bytes": size, "off_pct": round((size / planned - 1) * 100, 2)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "gguf")
    ap.add_argument("--src", type=Path, help="the BF16 SmolLM2 checkpoint (default: built from the embedded GGUF)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens per model (ctx 512)")
    ap.add_argument("--gptq", type=Path, help="an existing GPTQ g64 build to reuse")
    ap.add_argument("--skip-gptq", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timing-only", action="store_true",
                    help="only run A (conversion + imatrix + Q4_K_M), afresh, and print its parts")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from qtk.embedded import build_bf16_checkpoint

    a.work.mkdir(parents=True, exist_ok=True)
    src = a.src or build_bf16_checkpoint(a.work / "smollm2-135m-bf16")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "QTK_LOG_DIR": str(a.work / "logs")}
    cal = ["--samples", str(a.samples), "--seq-len", str(a.seq_len)]
    load_before = os.getloadavg()
    if a.timing_only:
        import shutil

        shutil.rmtree(a.work / "T-q4km-imatrix", ignore_errors=True)
        t = quantize(src, a.work / "T-q4km-imatrix", ["--method", "gguf", "--gguf-type", "Q4_K_M", *cal], env)
        print(json.dumps({"load_before": load_before, "load_after": os.getloadavg(), "wall_s": t["wall_s"],
                          "cpu_s": t["cpu_s"], "parts_wall_cpu_s": parts(t),
                          "peak_rss_bytes": t["provenance"]["peak_rss_bytes"]}, indent=1))
        return 0
    runs = {
        "A": quantize(src, a.work / "A-q4km-imatrix", ["--method", "gguf", "--gguf-type", "Q4_K_M", *cal], env),
        "B": quantize(src, a.work / "B-bf16-q8-iq4xs", ["--method", "gguf", "--gguf-type", "BF16", "--gguf-type", "Q8_0",
                                                         "--gguf-type", "IQ4_XS", *cal], env),
        "C": quantize(src, a.work / "C-q4km-plain", ["--method", "gguf", "--gguf-type", "Q4_K_M", "--no-imatrix"], env),
    }
    if not a.skip_gptq:
        gdir = a.gptq or a.work / "G-gptq-g64"
        runs["G"] = quantize(src, gdir, ["--method", "gptq", "--group-size", "64", *cal], env)
    base = src.name
    files = {"Q4_K_M imatrix": Path(runs["A"]["out"]) / f"{base}-Q4_K_M.gguf",
             "Q4_K_M no imatrix": Path(runs["C"]["out"]) / f"{base}-Q4_K_M.gguf",
             "IQ4_XS imatrix": Path(runs["B"]["out"]) / f"{base}-IQ4_XS.gguf",
             "Q8_0": Path(runs["B"]["out"]) / f"{base}-Q8_0.gguf",
             "BF16 (GGUF)": Path(runs["B"]["out"]) / f"{base}-BF16.gguf"}
    candidates = [str(p) for p in files.values()] + ([runs["G"]["out"]] if "G" in runs else [])
    from qtk.verify.run import VerifyOptions, verify

    t0, c0 = time.perf_counter(), time.process_time()
    report = verify(str(src), candidates, VerifyOptions(ctx=512, max_tokens=a.max_tokens, smoke=False, device="cpu"))
    verify_s = (time.perf_counter() - t0, time.process_time() - c0)
    labels = ["BF16 (transformers)", *files, *(["GPTQ g64 (qtk)"] if "G" in runs else [])]
    table = []
    for label, m in zip(labels, report["models"]):
        kl = m.get("kl") or {}
        table.append({"model": label, "size_MB": round(m["size_bytes"] / 1e6, 1), "ppl": round(m["perplexity"]["ppl"], 4),
                      "ppl_vs_bf16_pct": round(m.get("ppl_increase_pct") or 0.0, 2),
                      "kl_mean": round(kl["mean"], 5) if kl else None,
                      "top1_pct": round(kl["top1_agreement"] * 100, 2) if kl else None})
    by = {r["model"]: r for r in table}
    a_parts = parts(runs["A"])
    claims = {
        "Q8_0 ppl within 0.5% of BF16": abs(by["Q8_0"]["ppl_vs_bf16_pct"]) <= 0.5,
        "Q4_K_M imatrix KL < Q4_K_M without": by["Q4_K_M imatrix"]["kl_mean"] < by["Q4_K_M no imatrix"]["kl_mean"],
        "IQ4_XS imatrix not worse than Q4_K_M without (KL)": by["IQ4_XS imatrix"]["kl_mean"] <= by["Q4_K_M no imatrix"]["kl_mean"],
        "conversion + imatrix + Q4_K_M < 120 s wall (run A, whole process)": (runs["A"]["wall_s"] or 0) < 120,
    }
    if "G" in runs:
        claims["Q4_K_M imatrix KL < GPTQ g64"] = by["Q4_K_M imatrix"]["kl_mean"] < by["GPTQ g64 (qtk)"]["kl_mean"]
    sizes = plan_check(src, {k: v for k, v in files.items()})
    claims["qtk plan within 5% of every file"] = all(abs(r["off_pct"]) <= 5 for r in sizes)
    result = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
                    "python": platform.python_version()},
        "calibration": {"samples": a.samples, "seq_len": a.seq_len}, "eval": report["protocol"],
        "runs": {k: {kk: vv for kk, vv in r.items() if kk != "provenance"} | {"parts_wall_cpu_s": parts(r) if k != "G" else None}
                 for k, r in runs.items()},
        "timed_path_A": {"wall_s": runs["A"]["wall_s"], "cpu_s": runs["A"]["cpu_s"], "parts_wall_cpu_s": a_parts},
        "verify_wall_cpu_s": [round(x, 1) for x in verify_s], "table": table, "plan_vs_files": sizes, "claims": claims,
    }
    _print(result)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _print(r: dict) -> None:
    m = r["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, load {m['load_before'][0]:.1f} -> {m['load_after'][0]:.1f}; calibration "
          f"{r['calibration']['samples']} x {r['calibration']['seq_len']}; eval {r['eval']['max_tokens']} tokens, ctx {r['eval']['ctx']}")
    print("\n| model | size MB | ppl | ppl vs BF16 | KL mean | top-1 |\n|---|---:|---:|---:|---:|---:|")
    for t in r["table"]:
        kl = "-" if t["kl_mean"] is None else f"{t['kl_mean']:.5f}"
        top1 = "-" if t["top1_pct"] is None else f"{t['top1_pct']:.1f}%"
        print(f"| {t['model']} | {t['size_MB']} | {t['ppl']:.3f} | {t['ppl_vs_bf16_pct']:+.2f}% | {kl} | {top1} |")
    A = r["timed_path_A"]
    print(f"\nrun A (conversion + imatrix + Q4_K_M): wall {A['wall_s']} s, CPU {A['cpu_s']} s; parts (wall, CPU s): "
          + ", ".join(f"{k} {w:.1f}/{c:.1f}" for k, (w, c) in A["parts_wall_cpu_s"].items()))
    for k, run in r["runs"].items():
        print(f"run {k}: wall {run['wall_s']} s, CPU {run['cpu_s']} s{' (reused)' if run['reused'] else ''}")
    print("\nplan vs files:", ", ".join(f"{x['file']} {x['off_pct']:+.2f}%" for x in r["plan_vs_files"]))
    print("claims:", json.dumps(r["claims"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
