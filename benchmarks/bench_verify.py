"""qtk verify's measurement paths against the plain loops they wrap, on SmolLM2-135M-Instruct (CPU).

    python benchmarks/bench_verify.py [--tokens 4096] [--rounds 3] [--json out.json]

(1) HF perplexity: qtk's path (`HFModel.logits` + `token_nll` per window) vs a plain torch loop over
    the same windows (model(x).logits, cross_entropy on the second half), same dtype (fp32 on CPU).
(2) GGUF perplexity: qtk's path (`GGUFModel.logits` + `token_nll`) vs calling llama-cpp-python's
    `eval` + `scores` directly on the same windows.
Throughput ratio = qtk tokens/s / plain tokens/s (target >= 0.95x); the two alternate within each
round and the best round counts. The full comparison table comes from `qtk verify` itself (see
BENCHMARKS.md for the command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from qtk.embedded import build_bf16_checkpoint, shipped_gguf
    from qtk.verify.models import GGUFModel, HFModel
    from qtk.verify.perplexity import token_nll, windows
    from qtk.verify.run import load_text

    torch.set_num_threads(args.threads)
    cache = Path(os.environ.get("QTK_TEST_CACHE", Path(__file__).resolve().parent.parent / ".qtk-test-cache"))
    src = build_bf16_checkpoint(cache / "smollm2-135m-bf16")
    text, _ = load_text("prose-heldout", None)
    hf = HFModel(src, "bf16", "cpu", "bf16")
    gg = GGUFModel(shipped_gguf(), "gguf", args.threads, 4096)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "tokens": args.tokens, "ctx": args.ctx}

    def qtk_path(model):
        ids = model.tokenize(text)
        nll = [token_nll(model.logits(w.ids, start=w.first), w) for w in
               windows(ids, args.ctx, bos_id=model.bos_id, add_bos=model.add_bos, max_tokens=args.tokens)]
        return math.exp(float(np.concatenate(nll).mean())), sum(len(w) for w in nll) * 2

    def plain_torch():
        ids = hf.tok(text, add_special_tokens=False)["input_ids"]
        total, n, h = 0.0, 0, args.ctx // 2
        for i in range(args.tokens // args.ctx):
            x = torch.tensor([ids[i * args.ctx : (i + 1) * args.ctx]])
            with torch.no_grad():
                logits = hf.model(x).logits[0].float()
            total += torch.nn.functional.cross_entropy(logits[h:-1], x[0, h + 1 :], reduction="sum").item()
            n += args.ctx - h - 1
        return math.exp(total / n), n * 2

    def plain_llama():
        ids = gg.llm.tokenize(text.encode(), add_bos=False, special=False)
        total, n, h = 0.0, 0, args.ctx // 2
        for i in range(args.tokens // args.ctx):
            w = ids[i * args.ctx : (i + 1) * args.ctx]
            gg.llm.reset()
            gg.llm.eval(w)
            sc = np.array(gg.llm.scores[: len(w)], dtype=np.float64)[h:-1]
            sc -= sc.max(-1, keepdims=True)
            lp = sc - np.log(np.exp(sc).sum(-1, keepdims=True))
            total -= lp[np.arange(len(lp)), w[h + 1 :]].sum()
            n += len(lp)
        return math.exp(total / n), n * 2

    pairs = {"hf": (lambda: qtk_path(hf), plain_torch), "gguf": (lambda: qtk_path(gg), plain_llama)}
    for name, (ours, plain) in pairs.items():
        best = {"qtk": 0.0, "plain": 0.0}
        ppl = {}
        for r in range(args.rounds):
            for who, fn in ((("qtk", ours), ("plain", plain)) if r % 2 == 0 else (("plain", plain), ("qtk", ours))):
                t0 = time.perf_counter()
                p, _ = fn()
                dt = time.perf_counter() - t0
                best[who] = max(best[who], args.tokens / dt)
                ppl[who] = p
        ratio = best["qtk"] / best["plain"]
        report[name] = {"qtk_tokens_per_s": best["qtk"], "plain_tokens_per_s": best["plain"], "ratio": ratio,
                        "ppl_qtk": ppl["qtk"], "ppl_plain": ppl["plain"]}
        print(f"{name:5s} qtk {best['qtk']:7.1f} tok/s  plain {best['plain']:7.1f} tok/s  ratio {ratio:.3f}x  "
              f"ppl qtk {ppl['qtk']:.4f} plain {ppl['plain']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
