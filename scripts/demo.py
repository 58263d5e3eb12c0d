"""The main job on the embedded default, offline: serve the shipped SmolLM2-135M-Instruct from a local
Hub mirror, `qtk pull` it like any Hub repo, `qtk quantize` it (GPTQ and NF4), and `qtk verify` every result against BF16 and the shipped GGUF.

    bash scripts/demo.sh                  # sets up .venv, then runs this (its whole output: < 80 lines)
    .venv/bin/python scripts/demo.py      # if .venv is already set up

Everything lives under .qtk-demo/ (mirror store, HF_HOME, outputs). Runs again are idempotent:
pulls transfer nothing, finished quantizations are reused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from qtk._stdio import backend_output, run_log_path
from qtk.embedded import BF16_REPO, GGUF_NAME, GGUF_REPO, build_bf16_checkpoint, shipped_gguf

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("QTK_DEMO_DIR", ROOT / ".qtk-demo"))
TASK_LIMIT = 40  # documents of qtk_cloze per model (100 in all): accuracy beside perplexity in the table
RECIPES = [  # SmolLM2's hidden size 576 needs group size 64 (128 does not divide it)
    ("gptq", ["--group-size", "64", "--samples", "32", "--seq-len", "256", "--calibration", "chat"]),
    ("nf4", []),
]


def stage_mirror(store: Path) -> None:
    """The mirror's store: the shipped GGUF, and the BF16 checkpoint dequantized from it."""
    gguf_repo = store / GGUF_REPO
    gguf_repo.mkdir(parents=True, exist_ok=True)
    src = shipped_gguf()
    if not (gguf_repo / GGUF_NAME).exists() or (gguf_repo / GGUF_NAME).stat().st_size != src.stat().st_size:
        shutil.copyfile(src, gguf_repo / GGUF_NAME)
    bf16_repo = store / BF16_REPO
    if not (bf16_repo / "config.json").exists():
        log = run_log_path("demo", "bf16")
        print(f"building the BF16 checkpoint from the GGUF (once, ~25 s; torch's output: {log}) ...", flush=True)
        with backend_output(log):
            build_bf16_checkpoint(bf16_repo)


def qtk(*args: str, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "qtk", *args, "--json"], env=env, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"qtk {' '.join(args)} failed with exit code {r.returncode}")
    return json.loads(r.stdout)


def main() -> int:
    store = WORK / "mirror"
    stage_mirror(store)
    server = subprocess.Popen([sys.executable, "-m", "qtk", "serve", str(store), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        endpoint = server.stdout.readline().strip()
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(WORK / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
            env.pop(var, None)
        print(f"1. local Hub mirror at {endpoint} (store {store})")
        for repo, include in ((GGUF_REPO, ["*.gguf"]), (BF16_REPO, ["*.json", "*.safetensors", "*.jinja"])):
            doc = qtk("pull", repo, *[a for g in include for a in ("--include", g)], env=env)
            got = doc["stats"]["bytes_downloaded"]
            print(f"2. pulled {repo} @ {doc['commit'][:12]}: {len(doc['files'])} files, "
                  f"{doc['total_bytes'] / 1e6:.1f} MB, {got / 1e6:.1f} MB transferred, all hash-verified")
        snapshot = Path(doc["path"])
        outputs = {"bf16": snapshot}
        for method, extra in RECIPES:
            out = WORK / "quantized" / f"SmolLM2-135M-Instruct-{method}"
            if not (out / "qtk_provenance.json").exists():
                print(f"3. qtk quantize {BF16_REPO} --method {method} {' '.join(extra)}", flush=True)
                # qtk's own progress on the terminal; the backends' output goes to the log it names
                r = subprocess.run([sys.executable, "-m", "qtk", "quantize", BF16_REPO, "--method", method, *extra,
                                    "-o", str(out)], env=env, stdout=subprocess.DEVNULL)
                if r.returncode != 0:
                    sys.exit(f"qtk quantize failed with exit code {r.returncode}")
            else:
                print(f"3. {out} exists (quantized earlier)")
            outputs[method] = out
    finally:
        server.terminate()
        server.wait()

    gguf = str(WORK / "hf-home" / "hub" / f"models--{GGUF_REPO.replace('/', '--')}" / "snapshots")
    gguf = str(next(Path(gguf).glob(f"*/{GGUF_NAME}")))
    report = WORK / "report"
    report.mkdir(exist_ok=True)
    print("4. qtk verify: BF16 (reference) vs GPTQ vs NF4 vs the Q4_1 GGUF (llama.cpp): perplexity, KL, smoke, and "
          f"accuracy on qtk's cloze task (lm-eval, first {TASK_LIMIT} documents); every number in {report}/report.md, "
          ".json, .png", flush=True)
    r = subprocess.run([sys.executable, "-m", "qtk", "verify", str(outputs["bf16"]), str(outputs["gptq"]),
                        str(outputs["nf4"]), gguf, "--max-tokens", "2048", "--max-ppl-increase", "40",
                        "--tasks", "qtk_cloze", "--limit", str(TASK_LIMIT),
                        "--json", str(report / "report.json"), "--markdown", str(report / "report.md"),
                        "--plot", str(report / "report.png"), "--no-smoke-answers"], env=env)
    if r.returncode not in (0, 3):
        return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
