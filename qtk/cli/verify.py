"""``qtk verify``: thin wrapper over :mod:`qtk.verify`."""

from __future__ import annotations

from pathlib import Path

import click

from .. import errors
from .._fs import write_atomic, write_json
from ._output import get_output
from ._progress import backend_session

__all__ = ["verify_cmd", "gate_options"]


class GateLimit(click.ParamType):
    """A gate's limit on the command line: a finite number in the gate's range (``nan``, ``inf`` and
    negative numbers are refused with exit 2, as in a manifest)."""

    name = "number"

    def __init__(self, gate) -> None:
        self.gate = gate

    def convert(self, value, param, ctx):
        from ..verify.gates import limit_problem

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number.", param, ctx)
        if why := limit_problem(self.gate, number):
            self.fail(why + ".", param, ctx)
        return number


def gate_options(f):
    """One option per row of qtk.verify.gates.GATES (the command receives them by the gate's name)."""
    from ..verify.gates import GATES

    for g in reversed(GATES):
        metavar = "PCT" if g.unit == "%" else "X"
        f = click.option(g.option, g.name, type=GateLimit(g), metavar=metavar, help=g.help)(f)
    return f


@click.command("verify")
@click.argument("reference")
@click.argument("candidates", nargs=-1)
@click.option("--text", "text_spec", default="prose-heldout", show_default=True, metavar="NAME|FILE|hf://datasets/...",
              help="Evaluation text: a named set (never used for calibration by default), a file, or a Hub dataset.")
@click.option("--text-field", help="Field/column with the text in .jsonl/.parquet.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window size; the second half is scored.")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="Bound the work: tokens evaluated per model.")
@click.option("--gguf-file", help="GGUF file name inside a repo-id argument (or write org/repo:FILE.gguf).")
@click.option("--smoke/--no-smoke", default=True, show_default=True, help="Run the smoke generations.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="For HF models; GGUF always runs on the CPU through llama-cpp-python.")
@click.option("--threads", type=int, help="llama.cpp threads (GGUF).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every number (plus hardware, versions, text sha256, protocol) to this file; '-' for stdout.")
@click.option("--markdown", "md_file", type=click.Path(dir_okay=False, path_type=Path), help="Write a Markdown report.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG: quality vs size on disk, and decode tokens/s.")
@click.option("--tasks", "tasks", multiple=True, metavar="NAME[,NAME]",
              help="Downstream task accuracy through lm-eval, per model, with recovery = candidate / reference "
                   "accuracy: lm-eval's tasks (arc_easy, hellaswag, piqa, winogrande, mmlu, gsm8k...), qtk's own "
                   "qtk_cloze, or tasks of --tasks-dir.")
@click.option("--tasks-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of lm-eval task YAMLs (e.g. dataset_path: json over local jsonl; relative data_files "
                   "are relative to the YAML).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Documents per task: the first N of its evaluation split (default: all).")
@click.option("--num-fewshot", type=click.IntRange(min=0), metavar="N",
              help="Few-shot examples per task (default: each task's own).")
@gate_options
@click.option("--require-smoke", is_flag=True, help="Gate: every smoke answer non-empty, stopped, not looping.")
@click.option("--smoke-answers/--no-smoke-answers", default=True, show_default=True,
              help="Print the smoke answers side by side above the table (they are in --markdown/--json either way).")
@click.option("-q", "--quiet", is_flag=True, help="Nothing but the result (the table, or the JSON with --json -).")
@click.option("-v", "--verbose", is_flag=True,
              help="Stream the backends' own output live (default: into a per-run log file, path printed).")
def verify_cmd(reference, candidates, text_spec, text_field, ctx, max_tokens, gguf_file, smoke, max_new_tokens,
               temperature, top_p, seed, device, threads, json_file, md_file, plot_file, tasks, tasks_dir, limit,
               num_fewshot, require_smoke, smoke_answers, quiet, verbose, **limits) -> None:
    """Compare quantized models (and GGUF files) with a reference, with one protocol for every format.

    Each model is a checkpoint dir, a repo id (from the cache; pulled with qtk if missing), or a GGUF
    file (path.gguf, or org/repo:FILE.gguf). Measures: perplexity (llama.cpp's protocol: windows of
    --ctx tokens, second half scored, ± standard error), KL divergence of each candidate's next-token
    distribution from the reference's (mean, median, p99) and top-1 agreement, smoke generations
    through the chat template, and cost (load time, prefill/decode tokens/s, TTFT, size). With --tasks:
    accuracy (± stderr) per lm-eval task per model, and recovery = candidate / reference accuracy;
    offline, tasks read local files (--tasks-dir) or the HF datasets cache.

    \b
    Exit codes: 0 all gates passed, 3 a gate failed (the model and gate are named), others: errors.
    \b
    Examples:
      qtk verify ./smol-bf16 ./smol-gptq ./smol-nf4 SmolLM2-135M-Instruct.Q4_1.gguf --markdown report.md
      qtk verify meta-llama/Llama-3.1-8B-Instruct ./llama-awq --max-ppl-increase 5 --min-top1 90 --json r.json
      qtk verify ./smol-bf16 ./smol-gptq model.gguf --tasks qtk_cloze,arc_easy --limit 200 --min-recovery 95
      qtk verify ./base ./quant --tasks my_task --tasks-dir ./tasks --min-task-recovery 97
    """
    try:
        from ..verify import report as render
        from ..verify.run import Gates, VerifyOptions, check_gates, gate_error, verify
        from ..verify.tasks import parse_task_names
    except ImportError as exc:
        raise errors.BackendUnavailableError(f"qtk verify needs its extra: {exc}.",
                                             hint="pip install 'qtk[verify]' with torch pinned (README: Install).") from exc

    out = get_output()
    if quiet:
        out.quiet = True
    gates = Gates(**limits, require_smoke=require_smoke)
    if not candidates and gates.limits():
        raise errors.UsageError("Gates compare candidates with the reference: give at least one candidate.")
    task_names = tuple(parse_task_names(tasks))
    recovery_gates = [g for g in ("min_recovery_pct", "min_task_recovery_pct") if g in gates.limits()]
    if recovery_gates and not task_names:
        raise errors.UsageError(f"{', '.join(recovery_gates)} compares task accuracy: give --tasks.")
    if not task_names and (tasks_dir or limit or num_fewshot is not None):
        raise errors.UsageError("--tasks-dir, --limit and --num-fewshot apply to --tasks: give --tasks.")
    opts = VerifyOptions(text=text_spec, text_field=text_field, ctx=ctx, max_tokens=max_tokens, smoke=smoke,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         device=device, threads=threads, tasks=task_names,
                         tasks_dir=str(tasks_dir) if tasks_dir else None, limit=limit, num_fewshot=num_fewshot)
    if str(json_file) == "-":
        out.quiet = True  # stdout carries the JSON; the terminal gets nothing else but errors
    with backend_session(out, "verify", render.short_name(reference), verbose=verbose) as progress:
        report = verify(reference, list(candidates), opts, gguf_file=gguf_file, log=out.info, progress=progress)
        failures = check_gates(report, gates)
        report["gates"] = {**limits, "require_smoke": require_smoke, "failures": failures, "passed": not failures}
        if json_file is not None and str(json_file) != "-":
            write_json(json_file, report)
        if md_file is not None:
            write_atomic(md_file, render.markdown(report))
        if plot_file is not None:
            render.plot(report, plot_file)  # matplotlib's own chatter (font cache) stays in the log
    if str(json_file) == "-":
        out.json(report)  # strict JSON, redacted like every --json document
    if str(json_file) != "-":
        if smoke and smoke_answers and not quiet:  # the answers first: the table is the last thing on the terminal
            for m in report["models"]:
                for s in m["smoke"]:
                    mark = "ok " if s["ok"] else "BAD"
                    out.err.print(f"  [{mark}] {m['name'][:28]:<28} {s['name']:<12} {s['answer'][:70]!r}", markup=False)
        out.table(render.table(report))  # the result: stdout
    if failures:
        raise gate_error(failures)
