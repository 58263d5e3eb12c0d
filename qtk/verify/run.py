"""``qtk verify``: one protocol for every model — perplexity, KL vs the reference, smoke generation,
cost — then gates.

All models are loaded once; the text is processed window by window, so only one window of
whole-vocab logits per model is alive at a time.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field

from .. import __version__, errors
from .._stdio import stdout_to_stderr
from .gates import Gates, check_gates, gate_error
from .kl import KLAccumulator
from .models import Model, rss_bytes, open_model
from .perplexity import summarize, token_nll, windows
from .report import short_name
from .smoke import run_smoke
from ..texts import joined_text as load_text  # the one text loader (qtk.texts)

__all__ = ["VerifyOptions", "Gates", "verify", "check_gates", "gate_error", "load_text"]  # gates: qtk.verify.gates


@dataclass(frozen=True)
class VerifyOptions:
    text: str = "prose-heldout"  # a named set, a .txt/.jsonl/.parquet file, or hf://datasets/...
    text_field: str | None = None
    ctx: int = 512
    max_tokens: int | None = 4096
    smoke: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    tasks: tuple[str, ...] = ()  # lm-eval task names (qtk.verify.tasks): accuracy per task, recovery vs the reference
    tasks_dir: str | None = None  # more task YAMLs (local data: dataset_path json)
    limit: int | None = None  # documents per task (the first N)
    num_fewshot: int | None = None  # None: each task's own default


@dataclass
class ModelReport:
    name: str
    format: str
    role: str  # "reference" or "candidate"
    size_bytes: int
    load_s: float
    rss_delta_bytes: int | None
    tokens_in_text: int
    perplexity: dict
    prefill_tps: float
    kl: dict | None = None
    compute_dtype: str | None = None
    tokenization_match: float | None = None  # share of the reference's token ids this model reproduces
    smoke: list[dict] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)
    cuda_max_allocated_bytes: int | None = None
    ppl_increase_pct: float | None = None  # vs the reference; computed here once, read by gates, report, provision
    tasks: dict | None = None  # task name -> accuracy, stderr, documents, docs/s (qtk.verify.tasks)
    recovery: dict | None = None  # candidates: {"tasks": {name: pct}, "overall": pct} (qtk.verify.tasks.recovery)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Pass:
    """What one model accumulates while the windows stream by."""

    nlls: list = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    kl: KLAccumulator | None = None

    def logits(self, model: Model, w):
        t0 = time.monotonic()
        out = model.logits(w.ids, start=w.first)
        self.seconds += time.monotonic() - t0
        self.tokens += len(w.ids)
        return out

    @property
    def prefill_tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _no_progress(stage: str, done: int, total: int, peak_bytes: int | None = None, **_) -> None:
    pass


def _measure(models: list[Model], token_ids: list[list[int]], opts: VerifyOptions,
             progress=_no_progress) -> list[_Pass]:
    """One pass over the reference's windows: each window's reference logits serve every candidate
    (KL, top-1, and perplexity for candidates that tokenize identically). Candidates whose tokenizer
    differs get a second pass over their own windows for perplexity."""
    ref, ref_ids = models[0], token_ids[0]
    passes = [_Pass() for _ in models]
    for p, m in zip(passes[1:], models[1:]):
        if abs(m.vocab_size - ref.vocab_size) < 512:  # same vocabulary (up to padding)
            p.kl = KLAccumulator()
    ref_windows = list(windows(ref_ids, opts.ctx, bos_id=ref.bos_id, add_bos=ref.add_bos, max_tokens=opts.max_tokens))
    for n, w in enumerate(ref_windows):
        progress(f"perplexity + KL ({len(models)} models): windows done", n, len(ref_windows), _rss_peak())
        ref_logits = passes[0].logits(ref, w)
        passes[0].nlls.append(token_nll(ref_logits, w))
        for p, m, ids in zip(passes[1:], models[1:], token_ids[1:]):
            same = ids == ref_ids and m.add_bos == ref.add_bos
            if p.kl is None and not same:
                continue
            cand = p.logits(m, w)
            if p.kl is not None:
                p.kl.add(ref_logits, cand, w)
            if same:
                p.nlls.append(token_nll(cand, w))
    progress(f"perplexity + KL ({len(models)} models): windows done", len(ref_windows), len(ref_windows), _rss_peak())
    for p, m, ids in zip(passes[1:], models[1:], token_ids[1:]):
        if not p.nlls:  # its own tokens, its own windows
            for w in windows(ids, opts.ctx, bos_id=m.bos_id, add_bos=m.add_bos, max_tokens=opts.max_tokens):
                p.nlls.append(token_nll(p.logits(m, w), w))
    return passes


def _rss_peak() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def verify(reference: str, candidates: list[str], opts: VerifyOptions, *, gguf_file: str | None = None,
           log=lambda s: None, progress=_no_progress) -> dict:
    """``log``: model i/M loading, smoke generation i/M; ``progress(stage, done, total, peak_bytes)``:
    window i/N of the perplexity/KL pass."""
    from ..devices import resolve_device
    from ..modelspec import check_spec
    from .models import detect_format

    specs = [reference, *candidates]
    # every input before anything loads: each spec exists and is a model (or is a repo id), the device,
    # the text, and whether the local models fit together
    refs = [check_spec(s, gguf_file=gguf_file) for s in specs]
    device = resolve_device(opts.device)
    text, text_sha = load_text(opts.text, opts.text_field)
    n_ctx = max(opts.ctx, 4096)
    local = {r.spec: detect_format(r.path) for r in refs if r.path is not None}
    _check_memory(specs, local, device, opts.ctx)
    taskset = None
    if opts.tasks:  # found, datasets read, documents built: a typo fails before the first model loads
        from .tasks import load_tasks

        log(f"loading tasks: {', '.join(opts.tasks)}")
        with stdout_to_stderr():
            taskset = load_tasks(opts.tasks, opts.tasks_dir)
    models = _load_models(specs, opts, gguf_file=gguf_file, device=device, n_ctx=n_ctx, log=log)
    token_ids = [m.tokenize(text) for _, m, _ in models]
    passes = _measure([m for _, m, _ in models], token_ids, opts, progress)
    reports = []
    for (role, m, rss), ids, p in zip(models, token_ids, passes):
        rep = ModelReport(m.name, m.format, role, m.size_bytes, m.load_s, rss, len(ids),
                          summarize(p.nlls, len(ids)).to_dict(), p.prefill_tps,
                          p.kl.result().to_dict() if p.kl else None, getattr(m, "compute_dtype", None),
                          None if role == "reference" else _ids_match(ids, token_ids[0]))
        _smoke_and_peak(rep, m, opts, device, log, f"{len(reports) + 1}/{len(models)}")
        reports.append(rep)
    if taskset is not None:
        from .tasks import evaluate_all, recovery

        for rep, res in zip(reports, evaluate_all([m for _, m, _ in models], taskset, opts, n_ctx, progress)):
            rep.tasks = res
            rep.recovery = None if rep is reports[0] else recovery(reports[0].tasks, res)
    ref_ppl = reports[0].perplexity["ppl"]
    for rep in reports[1:]:  # a reference without a finite perplexity measures nothing: NaN, which fails the gate
        rep.ppl_increase_pct = (rep.perplexity["ppl"] / ref_ppl - 1) * 100 if math.isfinite(ref_ppl) else math.nan
    return {
        "qtk_version": __version__,
        "protocol": _protocol(opts, text_sha, taskset),
        "hardware": {"device": device, "machine": platform.machine(), "processor": platform.processor(),
                     "python": platform.python_version()},
        "versions": _versions(),
        "models": [r.to_dict() for r in reports],
    }


def _load_models(specs: list[str], opts: VerifyOptions, *, gguf_file, device: str, n_ctx: int, log):
    """(role, model, resident bytes its load added) for each spec, in order: the reference first."""
    models: list[tuple[str, Model, int | None]] = []
    for i, spec in enumerate(specs):
        before = rss_bytes()
        log(f"loading model {i + 1}/{len(specs)}: {short_name(spec)}")
        with stdout_to_stderr():
            m = open_model(spec, gguf_file=gguf_file, device=device, threads=opts.threads, n_ctx=n_ctx)
        after = rss_bytes()
        models.append(("reference" if i == 0 else "candidate", m, (after - before) if before and after else None))
    return models


def _ids_match(ids: list[int], ref_ids: list[int]) -> float:
    """The share of the reference's ids reproduced before the first difference (one differing token shifts
    everything after it, so a position-wise count would mean nothing)."""
    if ids == ref_ids:
        return 1.0
    n = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
    return n / max(len(ref_ids), 1)


def _smoke_and_peak(rep: ModelReport, m: Model, opts: VerifyOptions, device: str, log, which: str) -> None:
    """The smoke generations (when asked) and, on CUDA, the peak memory this model's passes allocated."""
    if opts.smoke:
        log(f"smoke generation {which}: {short_name(m.name)}")
        with stdout_to_stderr():
            rep.smoke = [s.to_dict() for s in run_smoke(m, max_new_tokens=opts.max_new_tokens,
                                                        temperature=opts.temperature, top_p=opts.top_p,
                                                        seed=opts.seed)]
    if device == "cuda":
        import torch

        rep.cuda_max_allocated_bytes = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()


def _protocol(opts: VerifyOptions, text_sha: str, taskset) -> dict:
    return {"ctx": opts.ctx, "scored": "second half of each window", "max_tokens": opts.max_tokens,
            "text": opts.text, "text_sha256": text_sha, "bos": "as each model's tokenizer adds it",
            "kl_on": "the reference's token ids", "smoke_max_new_tokens": opts.max_new_tokens,
            "temperature": opts.temperature, "top_p": opts.top_p, "seed": opts.seed,
            **({"tasks": taskset.protocol(limit=opts.limit, seed=opts.seed, num_fewshot=opts.num_fewshot)}
               if taskset is not None else {})}


def _memory_needed(path, fmt: str, device: str, ctx: int) -> tuple[str, int] | None:
    """(where, bytes): the planner's estimate for holding one local model of format ``fmt`` (None: not
    one it can read)."""
    from pathlib import Path

    from ..hfload import read_config
    from ..plan import FORMATS, inference_memory, quantized_format, shape_from_config

    p = Path(path)
    if fmt == "gguf":
        return "cpu", p.stat().st_size  # llama.cpp maps the file on the CPU; its KV cache is small next to it
    try:
        cfg = read_config(p, missing=f"{p} has no config.json.")
        shape = shape_from_config(cfg)
    except errors.QtkError:
        return None
    qc = cfg.get("quantization_config") or {}
    from ..methods import methods

    method = next((m.name for m in methods() if m.output_format == fmt), None)
    weights = quantized_format(method, int(qc.get("group_size") or 128)) if method else FORMATS["bf16"]
    return device, inference_memory(shape, weights, device=device, ctx=ctx)


def _check_memory(specs: list[str], local: dict[str, str], device: str, ctx: int) -> None:
    """verify holds every model at once: refuse before loading the first one when they cannot fit.
    ``local``: the format of each spec that is a local path (repo ids are sized only once pulled)."""
    from ..plan import check_fits

    if any(s not in local for s in specs):
        return
    needs = [_memory_needed(s, local[s], device, ctx) for s in specs]
    if any(n is None for n in needs):
        return
    for where in {w for w, _ in needs}:
        check_fits(sum(b for w, b in needs if w == where), where, f"Verifying {len(specs)} models at once",
                   hint="Compare fewer models per run (the reference plus one candidate), or use --device cpu.")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"qtk": __version__}
    for d in ("torch", "transformers", "gptqmodel", "bitsandbytes", "llama_cpp_python", "lm_eval"):
        try:
            out[d] = md.version(d.replace("_", "-"))
        except md.PackageNotFoundError:
            pass
    return out
